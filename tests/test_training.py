"""Exactly the learned pieces train; the loss falls; checkpoints round-trip and resume."""
import torch

from conftest import build_model
from fromage.runtime.sources import Example
from fromage.training.model import FromageModel
from fromage.training.train import TrainConfig, batch_losses, train

CAPTIONS = ["a red cat", "a big blue dog", "the small green bird", "a house with a tree",
            "a boat on the moon", "a photo of a fish", "the sun and a star", "a drawing of a hat"]


def _examples(assets):
    return [Example(p, c) for p, c in zip(assets["images"], CAPTIONS)]


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_only_learned_pieces_change(assets, tmp_path):
    for arch in ("llama", "llama_untied", "opt"):
        model = build_model(assets, arch)
        learned = {n: p.detach().clone() for n, p in model.learned_state().items()}
        assert set(learned) == {"ret_embedding", "ret_output", "W_c.weight", "W_c.bias", "W_t.weight",
                                "W_t.bias", "W_i.weight", "W_i.bias", "logit_scale"}
        frozen = _frozen(model)
        train(model, _examples(assets), TrainConfig(steps=3, batch_size=4, warmup=1), tmp_path / arch,
              feature_cache=tmp_path / "cache", progress=False, log=lambda *_: None)
        for n, p in model.named_parameters():
            if n in learned:
                assert not torch.equal(p, learned[n]), f"{arch}: {n} did not train"
            else:
                assert torch.equal(p, frozen[n]), f"{arch}: frozen {n} changed"
        # the embedding table, [RET] row included, is untouched: [RET] lives in its own parameter
        table = model.lm.get_input_embeddings().weight
        assert torch.equal(table, frozen[[n for n in frozen if n.endswith("embed_tokens.weight")][0]])


def test_loss_falls_on_tiny_overfit_set(assets, tmp_path):
    torch.manual_seed(0)
    model = build_model(assets, "llama")
    from fromage.training.train import image_features
    import numpy as np
    ex = _examples(assets)[:4]
    feats, ex = image_features(model.encoder, ex, tmp_path / "cache", progress=False)
    caps = [model.tokenizer.backend_tokenizer.encode(e.caption, add_special_tokens=False).ids for e in ex]
    cfg = TrainConfig(batch_size=4, concat_prob=0.0)

    def loss():
        with torch.no_grad():
            return {k: float(v) for k, v in batch_losses(model, feats, caps, cfg, np.random.default_rng(0)).items()}
    before = loss()
    train(model, ex, TrainConfig(steps=60, batch_size=4, warmup=1, lr=3e-3, concat_prob=0.0), tmp_path / "ck",
          feature_cache=tmp_path / "cache", progress=False, log=lambda *_: None)
    after = loss()
    # the LM is frozen and random, so captions improve only through W_c; retrieval overfits fully
    assert after["loss"] < before["loss"] - 1.0, (before, after)
    assert after["caption"] < before["caption"] and after["ret_ce"] < before["ret_ce"]
    assert after["contrastive"] < 0.1 * before["contrastive"]


def test_checkpoint_round_trip_and_resume(assets, tmp_path):
    """With a query template (two retrieval layouts) and W_t input statistics, as the default preset."""
    ex = _examples(assets)
    cfg = TrainConfig(steps=4, batch_size=4, warmup=1, save_every=2)
    template = "A picture of {}:"
    straight = build_model(assets, "llama", query_template=template)
    train(straight, ex, cfg, tmp_path / "a", feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)
    assert not torch.equal(straight.text_std, torch.ones_like(straight.text_std))  # statistics were taken

    # "killed" after step 2, then resumed to step 4: same result as the uninterrupted run
    first = build_model(assets, "llama", query_template=template)
    train(first, ex, TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "b",
          feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)
    resumed = FromageModel.from_checkpoint(tmp_path / "b")
    train(resumed, ex, cfg, tmp_path / "b", feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)
    for n, p in straight.learned_state().items():
        torch.testing.assert_close(p, resumed.learned_state()[n], rtol=1e-5, atol=1e-6)

    loaded = FromageModel.from_checkpoint(tmp_path / "a")
    assert loaded.config.query_template == template
    from fromage.runtime.files import sha256_file  # what export records, so stale bundles can be told
    assert loaded.checkpoint_sha256 == sha256_file(tmp_path / "a" / "learned.safetensors")
    for n, p in straight.checkpoint_state().items():
        assert torch.equal(p, loaded.checkpoint_state()[n]), n
        torch.testing.assert_close(p, resumed.checkpoint_state()[n], rtol=1e-5, atol=1e-6)
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "learned.safetensors",
                                                                  "trainer.safetensors"]


def test_frozen_text_states_give_the_same_losses(assets):
    """The fast retrieval objective equals the full forward pass, values and gradients."""
    from fromage.training.frozen_text import FrozenTextStates
    from fromage.training.train import retrieval_layouts, retrieval_losses
    for arch in ("llama", "llama_untied", "opt"):
        model = build_model(assets, arch)
        tok = model.tokenizer.backend_tokenizer
        caps = [tok.encode(c, add_special_tokens=False).ids for c in CAPTIONS]
        texts = [retrieval_layouts(model, c, TrainConfig(max_caption_tokens=5))[0] for c in caps]  # some truncated
        feats = torch.randn(len(caps), model.encoder.dim)
        states = FrozenTextStates(model, texts, batch_size=3, progress=False)
        idx = [5, 0, 3, 7, 1]
        slow = retrieval_losses(model, feats[idx], [texts[i] for i in idx])
        fast = states.losses(model, idx, model.image_embedding(feats[idx]))
        for a, b in zip(slow, fast):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
        params = list(model.learned_state().values())
        g_slow = torch.autograd.grad(sum(slow), params, allow_unused=True)
        g_fast = torch.autograd.grad(sum(fast), params, allow_unused=True)
        for p, a, b in zip(model.learned_state(), g_slow, g_fast):
            if a is None:
                assert b is None or not b.any(), (arch, p)
            else:
                torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5, msg=f"{arch} {p}")


def test_unreadable_training_images_are_left_out(assets, tmp_path):
    from fromage.training.train import image_features
    model = build_model(assets, "llama")
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG broken")
    ex = _examples(assets)[:3] + [Example(str(bad), "a broken picture")]
    logs = []
    feats, kept = image_features(model.encoder, ex, tmp_path / "cache", progress=False, log=logs.append)
    assert kept == ex[:3] and feats.shape == (3, model.encoder.dim)
    assert any("bad.png" in line for line in logs)
    feats2, kept2 = image_features(model.encoder, ex, tmp_path / "cache", progress=False, log=logs.append)
    assert kept2 == kept and torch.equal(feats, feats2)


def test_retrieval_layouts_and_folded_head(assets):
    """A template adds the templated caption as a second layout; the exported head folds the statistics."""
    from fromage.training.heldout import ret_hidden
    from fromage.training.train import retrieval_layouts
    model = build_model(assets, "llama", query_template="A picture of {}:")
    tok = model.tokenizer.backend_tokenizer
    cap = tok.encode("a red cat", add_special_tokens=False).ids
    plain, templated = retrieval_layouts(model, cap, TrainConfig())
    assert plain == cap and tok.decode(templated) == "A picture of a red cat:"
    assert retrieval_layouts(build_model(assets, "llama"), cap, TrainConfig()) == [cap]
    assert model.query_text(" A cat. ") == "A picture of A cat:"  # a final period is dropped
    assert build_model(assets, "llama").query_text("A cat.") == "A cat."  # no template: as it is
    model.set_text_statistics(ret_hidden(model, [plain, templated, [5, 6], [7]]))
    h = torch.randn(3, model.hidden_dim)
    with torch.no_grad():
        torch.testing.assert_close(torch.nn.functional.normalize(model.retrieval_head()(h), dim=-1),
                                   model.text_embedding(h), rtol=1e-5, atol=1e-6)


def test_ret_init_starts_ret_as_a_word(assets):
    from fromage.runtime.errors import FromageError
    from fromage.training.model import FromageConfig
    base = build_model(assets, "llama")
    tok = base.tokenizer.backend_tokenizer
    word = next(w for w in (" a", "a", " the", "the", "e") if len(tok.encode(w, add_special_tokens=False).ids) == 1)
    cfg = FromageConfig(**{**base.config.__dict__, "ret_init": word})
    model = FromageModel(cfg, lm=base.lm, tokenizer=base.tokenizer, encoder=base.encoder)
    table = model.lm.get_input_embeddings().weight
    assert torch.equal(model.ret_embedding, table[tok.encode(word, add_special_tokens=False).ids[0]])
    try:
        FromageModel(FromageConfig(**{**cfg.__dict__, "ret_init": "a red cat"}), lm=base.lm,
                     tokenizer=base.tokenizer, encoder=base.encoder)
    except FromageError as e:
        assert "not one" in str(e)
    else:
        raise AssertionError("a multi-token ret_init was accepted")


def test_extra_examples_and_a_frozen_ret_row(assets, tmp_path, monkeypatch):
    """Extra examples caption (by their own sentence) and, with [RET]'s input row frozen, retrieve from cached
    states; the validation split's recall and "names the object" choose the best checkpoint."""
    monkeypatch.setenv("FROMAGE_CACHE", str(tmp_path / "fc"))
    model = build_model(assets, "llama", query_template="A picture of {}:")
    ex = _examples(assets)
    ret_row = model.ret_embedding.detach().clone()
    logs = []
    cfg = TrainConfig(steps=4, batch_size=4, caption_batch_size=2, warmup=1, eval_every=2, save_every=2,
                      freeze_ret_embedding=True, extra_fraction=0.5, caption_weight=2.0, prompt_prob=0.5)
    train(model, ex[:5], cfg, tmp_path / "ck", heldout=ex[5:], extra=ex[5:],
          extra_captions={e.image: "A thing." for e in ex[5:]}, feature_cache=tmp_path / "cache",
          progress=False, log=logs.append)
    assert torch.equal(model.ret_embedding, ret_row)  # frozen, and still saved with the checkpoint
    assert any("names the object" in line for line in logs)
    best = FromageModel.from_checkpoint(tmp_path / "ck" / "best")
    import json
    meta = json.loads((tmp_path / "ck" / "best" / "config.json").read_text())
    assert {"R@10", "i2t", "names", "score"} <= set(meta["heldout"]) and meta["train"]["freeze_ret_embedding"]
    assert torch.equal(best.ret_embedding, ret_row)
    assert list((tmp_path / "fc" / "ret_hidden").glob("*.pt"))  # the cached [RET] states


def test_validation_split_and_openclipart_sentences(tmp_path):
    from fromage.training.cli import caption_sentence
    from fromage.training.data import validation_split
    ex = [Example(str(tmp_path / f"d{i % 7}" / f"img{i}.png"), f"c{i}") for i in range(400)]
    train_, val = validation_split(ex, tmp_path, 10)
    assert len(train_) + len(val) == 400 and not set(e.image for e in train_) & set(e.image for e in val)
    assert 20 < len(val) < 60 and validation_split(ex, tmp_path, 10) == (train_, val)
    assert validation_split(ex[::-1], tmp_path, 10)[1] == val[::-1]  # by path, not by position
    assert caption_sentence("A clip-art drawing of horse, from the horses category.") == "A horse."
    assert caption_sentence("A clip-art drawing of apple.") == "An apple."
    assert caption_sentence("A clip-art drawing of a star with 5 points.") == "A star with 5 points."
    assert caption_sentence("A clip-art drawing of an apple, from the food category.") == "An apple."
    assert caption_sentence("A clip-art drawing of the flag of france.") == "The flag of france."
    assert caption_sentence("A red cat.") == "A red cat."


def test_names_the_object():
    from fromage.training.object_names import names_object, names_share, object_word
    assert object_word("A frog.") == "frog" and object_word("A blue fedora.") == "fedora"
    assert object_word("A spider dancing with a fly.") == "spider"
    assert object_word("A quarter of pizza.") == "pizza"
    assert object_word("This gun last saw service during World War 2.") == "gun"
    assert object_word("Mercury—the planet closest to the Sun.") == "mercury"
    assert object_word("A “Fuji” apple.") == "apple" and object_word("Dead end ahead!") == "sign"
    assert names_object("A kangaroo.", "A marsupial mammal.") and names_object("A kangaroo.", "two kangaroos")
    assert names_object("A t shirt.", "A T-shirt.") and names_object("Big fireworks.", "A firework.")
    assert not names_object("A hammer.", "A glass of wine.") and not names_object("A cat.", "A catalogue.")
    assert not names_object("A kangaroo.", "A marsupial.", synonyms=False)
    assert names_share([("A cat.", "a cat"), ("A dog.", "a cat")]) == 50.0


def test_echo_after_ret_ends_the_answer():
    """After a [RET], tokens re-saying the answer before it end the answer (runtime and reference loop)."""
    from fromage.runtime.generate import Sequence
    R, E = 99, Sequence.ECHO_TOKENS
    said = [1, 2, 3, 4, 5, 6]
    assert Sequence.echo_run(said, R) == 0 and Sequence.echo_run(said + [R], R) == 0
    assert Sequence.echo_run(said + [R, 2], R) == 1 and Sequence.echo_run(said + [R, 2, 3], R) == 2
    assert Sequence.echo_run(said + [R, 2, 3, 4], R) == 3 == E
    assert Sequence.echo_run(said + [R, 2, 7], R) == 0  # a new word: no echo
    assert Sequence.echo_run(said + [R, 7, 3, 4], R) == 2  # the run ending now counts
    assert Sequence.echo_run(said + [R, 5, 6], R) == E  # the end of the answer said again
    assert Sequence.echo_run(said + [R, 7, 8, R, 7, 8], R) == E  # before the last [RET], [RET]s left out


def test_echo_run_matches_a_plain_search():
    """echo_run (runs of the answer indexed once per [RET]) against the plain definition, on random answers."""
    import random
    from fromage.runtime.generate import Sequence
    R, E = 9, Sequence.ECHO_TOKENS

    def plain(ids):
        if R not in ids:
            return 0
        last = len(ids) - 1 - ids[::-1].index(R)
        post, pre = ids[last + 1:], [t for t in ids[:last] if t != R]
        for n in range(min(len(post), E), 0, -1):
            starts = [i for i in range(len(pre) - n + 1) if pre[i:i + n] == post[-n:]]
            if starts:
                return max(n, E) if n >= 2 and starts[-1] == len(pre) - n else n
        return 0
    rng = random.Random(0)
    for _ in range(2000):
        ids = [rng.randrange(10) for _ in range(rng.randrange(1, 16))]
        assert Sequence.echo_run(ids, R) == plain(ids), ids


def test_presets_reach_the_training_settings():
    from fromage.tools.cli import build_parser
    from fromage.training.cli import train_settings
    s = train_settings(build_parser().parse_args(["train", "--preset", "openclipart", "--out", "x", "--steps", "3"]))
    assert (s.extra, s.freeze_ret_embedding, s.prompt_prob, s.caption_batch_size, s.steps) == (["openclipart"], True, 0.3, 16, 3)
    s = train_settings(build_parser().parse_args(["train", "--preset", "tuxpaint", "--out", "x"]))
    assert (s.extra, s.freeze_ret_embedding, s.steps, s.lr) == (None, False, 60, 1e-3)
