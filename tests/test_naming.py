"""The closed-form naming W_c: template rows fixed, the slot a ridge map onto word embeddings."""
import torch

from conftest import build_model
from fromage.training.object_names import object_word
from fromage.training.naming import fit_naming, naming_model, ridge_map, template_tokens, word_embedding

TEMPLATE = "a picture of a {}."
CAPTIONS = ["A red cat.", "A big blue dog.", "The small green bird.", "A house with a tree.",
            "A boat on the moon.", "A photo of a fish.", "The sun and a star.", "A drawing of a hat."]


def test_ridge_map_folds_standardisation():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 12, generator=g) * torch.linspace(0.1, 5, 12) + 3
    true = torch.randn(4, 12, generator=g)
    y = x @ true.T + 1.5
    w, b = ridge_map(x, y, 1e-6)  # ~least squares: recovers the affine map of the raw features
    assert torch.allclose(x @ w.T + b, y, atol=1e-3)
    w_big, b_big = ridge_map(x, y, 1e9)  # all shrinkage: the mean target
    assert torch.allclose(x @ w_big.T + b_big, y.mean(0).expand_as(y), atol=1e-2)


def test_fit_naming_sets_template_rows_and_slot(assets, tmp_path):
    probe = build_model(assets, "llama", k=1)
    before, after = template_tokens(probe.tokenizer.backend_tokenizer, TEMPLATE)
    k = len(before) + 1 + len(after)
    model = build_model(assets, "llama", k=k)
    feats = torch.randn(len(CAPTIONS), model.encoder.dim, generator=torch.Generator().manual_seed(1))
    fit_naming(model, feats, CAPTIONS, lam=1e-3, template=TEMPLATE)
    with torch.no_grad():
        vis = model.visual_tokens(feats)  # (N, k, E)
    table = model.lm.get_input_embeddings().weight
    fixed = before + [None] + after
    for i, tok in enumerate(fixed):
        if tok is not None:  # template rows: the token's own embedding, whatever the image
            assert torch.allclose(vis[:, i], table[tok].expand_as(vis[:, i]), atol=1e-6)
    slot = vis[:, len(before)]
    targets = torch.stack([word_embedding(model, object_word(c)) for c in CAPTIONS])
    # 8 images, feature dim 32 > 8: a near-zero ridge interpolates the training targets
    assert torch.allclose(slot, targets, atol=1e-2)


def test_naming_model_keeps_base_pieces(assets, tmp_path):
    base = build_model(assets, "llama", k=1)
    base.save_checkpoint(tmp_path / "base")
    model = naming_model(tmp_path / "base", TEMPLATE, lm=base.lm, tokenizer=base.tokenizer,
                         encoder=base.encoder)
    before, after = template_tokens(base.tokenizer.backend_tokenizer, TEMPLATE)
    assert model.config.k == len(before) + 1 + len(after)
    for name in ("W_t.weight", "W_i.weight", "ret_embedding", "ret_output", "logit_scale"):
        assert torch.equal(model.checkpoint_state()[name], base.checkpoint_state()[name])
    assert model.W_c.weight.shape == (model.config.k * model.embed_dim, model.encoder.dim)


def test_checkpoint_stores_only_the_slot_rows(assets, tmp_path):
    probe = build_model(assets, "llama", k=1)
    before, after = template_tokens(probe.tokenizer.backend_tokenizer, TEMPLATE)
    model = build_model(assets, "llama", k=len(before) + 1 + len(after))
    feats = torch.randn(len(CAPTIONS), model.encoder.dim, generator=torch.Generator().manual_seed(2))
    fit_naming(model, feats, CAPTIONS, lam=1.0, template=TEMPLATE)
    model.save_checkpoint(tmp_path / "ck")
    from safetensors.torch import load_file
    stored = load_file(tmp_path / "ck" / "learned.safetensors")
    assert stored["W_c.weight"].shape == (model.embed_dim, model.encoder.dim)
    from fromage.training.model import FromageModel
    again = FromageModel.from_checkpoint(tmp_path / "ck", lm=model.lm, tokenizer=model.tokenizer,
                                         encoder=model.encoder)
    assert again.config.visual_template == TEMPLATE
    assert torch.equal(again.W_c.weight, model.W_c.weight) and torch.equal(again.W_c.bias, model.W_c.bias)
    # a W_c trained further (template rows changed) is stored whole
    with torch.no_grad():
        model.W_c.bias[0] += 1
    model.save_checkpoint(tmp_path / "ck2")
    assert load_file(tmp_path / "ck2" / "learned.safetensors")["W_c.weight"].shape == model.W_c.weight.shape
    again = FromageModel.from_checkpoint(tmp_path / "ck2", lm=model.lm, tokenizer=model.tokenizer,
                                         encoder=model.encoder)
    assert torch.equal(again.W_c.bias, model.W_c.bias)


def test_a_slot_alone_is_stored_whole(assets, tmp_path):
    """The template "{}" (k = 1, no fixed rows) saves and loads as the plain W_c."""
    model = build_model(assets, "llama", k=1)
    feats = torch.randn(len(CAPTIONS), model.encoder.dim, generator=torch.Generator().manual_seed(3))
    fit_naming(model, feats, CAPTIONS, lam=1.0, template="{}")
    model.save_checkpoint(tmp_path / "ck")
    from fromage.training.model import FromageModel
    again = FromageModel.from_checkpoint(tmp_path / "ck", lm=model.lm, tokenizer=model.tokenizer,
                                         encoder=model.encoder)
    assert torch.equal(again.W_c.weight, model.W_c.weight) and torch.equal(again.W_c.bias, model.W_c.bias)
