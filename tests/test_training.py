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
