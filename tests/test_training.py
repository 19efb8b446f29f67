"""Exactly the learned pieces train; the loss falls; checkpoints round-trip and resume."""
import torch

from conftest import build_model
from fromage.training.data import Example
from fromage.training.model import FromageModel
from fromage.training.train import TrainConfig, batch_losses, train

CAPTIONS = ["a red cat", "a big blue dog", "the small green bird", "a house with a tree",
            "a boat on the moon", "a photo of a fish", "the sun and a star", "a drawing of a hat"]


def _examples(assets):
    return [Example(p, c) for p, c in zip(assets["images"], CAPTIONS)]


def _frozen(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}


def test_only_learned_pieces_change(assets, tmp_path):
    for arch, expect_ret_output in (("llama", False), ("llama_untied", True), ("opt", False)):
        model = build_model(assets, arch)
        learned = {n: p.detach().clone() for n, p in model.learned_state().items()}
        assert ("ret_output" in learned) == expect_ret_output
        assert set(learned) - {"ret_output"} == {"ret_embedding", "W_c.weight", "W_c.bias", "W_t.weight",
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
    ex = _examples(assets)
    cfg = TrainConfig(steps=4, batch_size=4, warmup=1, save_every=2)
    straight = build_model(assets, "llama")
    train(straight, ex, cfg, tmp_path / "a", feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)

    # "killed" after step 2, then resumed to step 4: same result as the uninterrupted run
    first = build_model(assets, "llama")
    train(first, ex, TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "b",
          feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)
    resumed = FromageModel.from_checkpoint(tmp_path / "b")
    train(resumed, ex, cfg, tmp_path / "b", feature_cache=tmp_path / "c", progress=False, log=lambda *_: None)
    for n, p in straight.learned_state().items():
        torch.testing.assert_close(p, resumed.learned_state()[n], rtol=1e-5, atol=1e-6)

    loaded = FromageModel.from_checkpoint(tmp_path / "a")
    for n, p in straight.learned_state().items():
        assert torch.equal(p, loaded.learned_state()[n])
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["config.json", "learned.safetensors",
                                                                  "trainer.safetensors"]


def test_frozen_text_states_give_the_same_losses(assets):
    """The fast retrieval objective equals the full forward pass, values and gradients."""
    from fromage.training.frozen_text import FrozenTextStates
    from fromage.training.train import retrieval_losses
    for arch in ("llama", "llama_untied", "opt"):
        model = build_model(assets, arch)
        tok = model.tokenizer.backend_tokenizer
        caps = [tok.encode(c, add_special_tokens=False).ids for c in CAPTIONS]
        cfg = TrainConfig(max_caption_tokens=5)  # some captions get truncated
        feats = torch.randn(len(caps), model.encoder.dim)
        states = FrozenTextStates(model, caps, cfg, batch_size=3, progress=False)
        idx = [5, 0, 3, 7, 1]
        slow = retrieval_losses(model, feats[idx], [caps[i] for i in idx], cfg)
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
