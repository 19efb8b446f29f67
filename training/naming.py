"""W_c that makes the frozen LM name what it sees, fitted in closed form (no LM passes).

A single visual token that is exactly the LM's input embedding of the object's word does not make
SmolLM2-135M say that word; the same word inside a short sentence does ("A picture of a duck." then
"This is a picture of" -> " a duck."). So W_c here emits k visual tokens, one per token of
NAMING_TEMPLATE (its own token embeddings: W_c's bias, no weight) and one for its "{}" slot: a ridge
regression from the image feature onto the mean input embedding of the object's word (the head noun
of each training caption, `object_names.object_word`). Still one linear map, so export and
the runtime are unchanged apart from k. Measurements: training/default/MODEL_CARD.md.

    fromage train-naming --out CKPT   # the shipped retrieval pieces + this W_c
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

from fromage.runtime.errors import FromageError

from .model import FromageConfig, FromageModel
from .object_names import object_word

NAMING_TEMPLATE = "Q: What is this?\nA: A {}.\n"  # chosen on the validation split
RIDGE = 1000.0  # on standardised features; chosen on the validation split


def template_tokens(tokenizer, template: str = NAMING_TEMPLATE) -> tuple[list[int], list[int]]:
    """The token ids of the template before and after its "{}" slot."""
    if template.count("{}") != 1:
        raise FromageError(f"naming template {template!r} needs exactly one '{{}}'")
    before, after = template.split("{}")
    enc = lambda t: tokenizer.encode(t, add_special_tokens=False).ids if t else []  # noqa: E731
    return enc(before), enc(after)


def word_embedding(model: FromageModel, word: str) -> torch.Tensor:
    """The mean input embedding of " word"'s tokens (how the word would follow "a")."""
    ids = model.tokenizer.backend_tokenizer.encode(" " + word, add_special_tokens=False).ids
    return model.lm.get_input_embeddings().weight[ids].detach().mean(0)


def ridge_map(features: torch.Tensor, targets: torch.Tensor, lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Ridge regression on per-dimension standardised features, folded back into one affine map of
    the raw features -> (weight (T, D), bias (T,)) with targets ≈ features @ weight.T + bias."""
    x, y = features.double(), targets.double()
    mu, sd = x.mean(0), x.std(0) + 1e-6
    xs, ym = (x - mu) / sd, y.mean(0)
    a = torch.linalg.solve(xs.T @ xs + lam * torch.eye(x.shape[1], dtype=x.dtype), xs.T @ (y - ym))  # (D, T)
    weight = (a / sd[:, None]).T
    return weight.float(), (ym - weight @ mu).float()


@torch.no_grad()
def fit_naming(model: FromageModel, features: torch.Tensor, captions: list[str], lam: float = RIDGE,
               template: str = NAMING_TEMPLATE) -> None:
    """Sets model.W_c (k must be the template's token count + 1) from (N, D) image features and their captions."""
    targets = torch.stack([word_embedding(model, object_word(c)) for c in captions])
    weight, bias = ridge_map(features, targets, lam)
    expanded = expand_w_c(model, weight, bias, template)  # checks k against the template
    model.config.visual_template = template
    model.W_c.weight.copy_(expanded["W_c.weight"])
    model.W_c.bias.copy_(expanded["W_c.bias"])


def _layout(model: FromageModel, template: str | None = None) -> tuple[torch.Tensor, int]:
    """(the template's fixed rows as (k, E) embeddings, the slot's index) of `template` (default: the
    model's visual_template)."""
    template = template or model.config.visual_template
    before, after = template_tokens(model.tokenizer.backend_tokenizer, template)
    if len(before) + 1 + len(after) != model.config.k:
        raise FromageError(f"visual_template {template!r} needs k = "
                           f"{len(before) + 1 + len(after)}, the model has k = {model.config.k}")
    rows = model.lm.get_input_embeddings().weight.detach()[before + [0] + after].clone()
    return rows, len(before)


@torch.no_grad()
def compact_w_c(model: FromageModel) -> dict[str, torch.Tensor]:
    """W_c's slot rows alone (a k-fold smaller checkpoint), when its other rows are still the template's
    embeddings with no weight; else W_c as it is."""
    e, k = model.embed_dim, model.config.k
    rows, slot = _layout(model)
    w = model.W_c.weight.detach().view(k, e, -1)
    b = model.W_c.bias.detach().view(k, e)
    fixed = [i for i in range(k) if i != slot]
    if not fixed or w[fixed].abs().sum() > 0 or not torch.equal(b[fixed], rows[fixed]):
        return {"W_c.weight": model.W_c.weight.detach().clone(), "W_c.bias": model.W_c.bias.detach().clone()}
    return {"W_c.weight": w[slot].clone(), "W_c.bias": b[slot].clone()}


def expand_w_c(model: FromageModel, weight: torch.Tensor, bias: torch.Tensor,
               template: str | None = None) -> dict[str, torch.Tensor]:
    """The full W_c from its slot rows (`compact_w_c`, or a fit) and the embeddings of `template` (default:
    the model's visual_template)."""
    e, k, d = model.embed_dim, model.config.k, model.encoder.dim
    if weight.shape != (e, d) or bias.shape != (e,):
        raise FromageError(f"W_c of shape {tuple(weight.shape)} is neither the full map nor its slot rows ({e}, {d})")
    rows, slot = _layout(model, template)
    w = torch.zeros(k, e, d)
    w[slot], rows[slot] = weight, bias
    return {"W_c.weight": w.reshape(k * e, d), "W_c.bias": rows.reshape(k * e)}


def naming_model(base, template: str = NAMING_TEMPLATE, **backbones) -> FromageModel:
    """A model with `base`'s (a checkpoint folder) retrieval pieces and the k visual tokens `template` needs
    (W_c left to `fit_naming`)."""
    import json
    from safetensors.torch import load_file
    base = Path(base)
    meta = json.loads((base / "config.json").read_text())
    cfg = FromageConfig.from_dict(meta)
    model = FromageModel(cfg, **backbones)
    before, after = template_tokens(model.tokenizer.backend_tokenizer, template)
    k = len(before) + 1 + len(after)
    if k != cfg.k:
        cfg.k = k
        model = FromageModel(cfg, lm=model.lm, tokenizer=model.tokenizer, encoder=model.encoder)
    state = {n: t for n, t in load_file(base / "learned.safetensors").items() if not n.startswith("W_c.")}
    own = model.checkpoint_state()
    with torch.no_grad():
        for n, t in state.items():
            own[n].copy_(t)
    return model


def _provenance(base) -> dict:
    """Where the kept pieces ([RET] rows, W_t, W_i) come from: the base checkpoint's training record."""
    import json
    meta = json.loads((Path(base) / "config.json").read_text())
    if "retrieval_pieces" in meta:
        return meta["retrieval_pieces"]
    skip = set(FromageConfig.__dataclass_fields__) | {"format", "version", "naming"}
    return {"from": Path(base).name, **{k: v for k, v in meta.items() if k not in skip}}


def cmd_naming(args) -> None:
    """`fromage train-naming`: W_c fitted in closed form on a checkpoint's training images."""
    from fromage.runtime.sources import load_split
    from .data import validation_split
    from .heldout import greedy_captions
    from .object_names import names_share
    from .train import image_features
    from .cli import DEFAULT_CHECKPOINT, _set_threads
    _set_threads(args.threads)
    t0 = time.perf_counter()
    base = args.base or DEFAULT_CHECKPOINT
    ridge = RIDGE if args.ridge is None else args.ridge
    template = args.template or NAMING_TEMPLATE
    model = naming_model(base, template)
    train, _, _ = load_split(args.tuxpaint)  # the held-out split is never read here
    fit, val = (train, []) if args.all_training else validation_split(train, args.tuxpaint)
    features, fit = image_features(model.encoder, fit)
    fit_naming(model, features, [e.caption for e in fit], ridge, template)
    extra = {"naming": {"template": template, "ridge": ridge, "fit_images": len(fit)},
             "retrieval_pieces": _provenance(base)}
    if val:
        vf, val = image_features(model.encoder, val)
        share = names_share((e.caption, g) for e, g in zip(val, greedy_captions(model, vf)))
        extra["naming"]["validation_names_percent"] = share
        print(f"validation ({len(val)} images): greedy captions name the object {share:.1f} %")
    model.save_checkpoint(args.out, extra=extra)
    print(f"k = {model.config.k}; checkpoint written to {args.out} in {time.perf_counter() - t0:.0f} s")
