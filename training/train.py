"""The training loop: captioning + retrieval objectives on image-caption pairs (DESIGN.md §1).

Frozen image features are computed once through the on-disk cache; each step then only runs
the LM. Batches are drawn from a generator seeded by the step, so a resumed run sees the same
data it would have seen without the interruption.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fromage.runtime.errors import FromageError
from fromage.runtime.preprocess import preprocess

from .backbones import cache_root
from .data import Example, FeatureCache
from .model import FromageModel

TRAINER_STATE = "trainer.safetensors"


@dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32
    lr: float = 3e-4
    betas: tuple = (0.9, 0.95)
    warmup: int = 100
    grad_clip: float = 1.0
    max_caption_tokens: int = 24
    concat_prob: float = 0.5         # captioning: two examples in one sequence
    seed: int = 0
    save_every: int = 200


def image_features(model: FromageModel, examples: list[Example], cache_dir=None, progress=True) -> torch.Tensor:
    cache = FeatureCache(cache_dir or cache_root() / "features", model.encoder.fingerprint())
    pp = model.encoder.preprocessing

    def compute(paths):
        return model.encode_images(torch.from_numpy(preprocess(paths, pp))).numpy()
    return torch.from_numpy(cache.get_many([e.image for e in examples], compute, progress=progress))


def _pad(seqs: list[torch.Tensor], labels: list[torch.Tensor]):
    n = max(s.shape[0] for s in seqs)
    emb = torch.zeros(len(seqs), n, seqs[0].shape[1])
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    mask = torch.zeros(len(seqs), n, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        emb[i, : len(s)], lab[i, : len(s)], mask[i, : len(s)] = s, l, 1
    return emb, mask, lab


def _lm_loss(logits, labels):
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)


def batch_losses(model: FromageModel, features: torch.Tensor, captions: list[list[int]],
                 cfg: TrainConfig, rng: np.random.Generator) -> dict[str, torch.Tensor]:
    """Caption loss on `[prefix] [k visual tokens] caption`, and on `[prefix] caption [RET]` the
    next-token loss plus symmetric InfoNCE between W_t(h_[RET]) and W_i(image)."""
    prefix = torch.tensor(model_prefix(model), dtype=torch.long)
    k, b = model.config.k, len(captions)
    vis = model.visual_tokens(features)
    cap_ids = [torch.tensor(c[: cfg.max_caption_tokens], dtype=torch.long) for c in captions]

    def caption_piece(i):
        ids = cap_ids[i]
        emb = torch.cat([vis[i], model.embed_tokens(ids)])
        lab = torch.cat([torch.full((k,), -100, dtype=torch.long), ids])
        return emb, lab

    seqs, labs = [], []
    for i in range(b):
        pieces = [caption_piece(i)]
        if b > 1 and rng.random() < cfg.concat_prob:
            pieces.append(caption_piece((i + 1) % b))
        emb = torch.cat([model.embed_tokens(prefix)] + [p[0] for p in pieces])
        lab = torch.cat([torch.full((len(prefix),), -100, dtype=torch.long)] + [p[1] for p in pieces])
        seqs.append(emb), labs.append(lab)
    emb, mask, lab = _pad(seqs, labs)
    _, logits = model.forward_lm(emb, mask)
    cap_loss = _lm_loss(logits, lab)

    # retrieval: a caption that is too long keeps its first tokens and ends in [RET]
    ret_ids = [torch.cat([prefix, c[: cfg.max_caption_tokens - 1], torch.tensor([model.ret_id])]) for c in cap_ids]
    seqs = [model.embed_tokens(ids) for ids in ret_ids]
    labs = [torch.cat([torch.full((len(prefix),), -100, dtype=torch.long), ids[len(prefix):]]) for ids in ret_ids]
    emb, mask, lab = _pad(seqs, labs)
    hidden, logits = model.forward_lm(emb, mask)
    ret_ce = _lm_loss(logits, lab)
    ret_pos = torch.tensor([len(ids) - 1 for ids in ret_ids])
    t = model.text_embedding(hidden[torch.arange(b), ret_pos])
    v = model.image_embedding(features)
    scale = model.logit_scale.clamp(max=math.log(100)).exp()
    sim = scale * t @ v.T
    target = torch.arange(b)
    contrastive = (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2
    return {"caption": cap_loss, "ret_ce": ret_ce, "contrastive": contrastive,
            "loss": cap_loss + ret_ce + contrastive}


def model_prefix(model: FromageModel) -> list[int]:
    from fromage.runtime.prompt import special_prefix
    return special_prefix(model.tokenizer.backend_tokenizer)


def _save_trainer(directory: Path, opt: torch.optim.Optimizer, names: dict, step: int) -> None:
    from safetensors.torch import save_file
    tensors = {}
    for p, state in opt.state.items():
        for key in ("exp_avg", "exp_avg_sq"):
            tensors[f"{names[p]}.{key}"] = state[key].contiguous()
    tmp = directory / (TRAINER_STATE + ".tmp")
    save_file(tensors, tmp, metadata={"step": str(step)})
    tmp.replace(directory / TRAINER_STATE)


def _load_trainer(directory: Path, opt: torch.optim.Optimizer, params: dict, step: int) -> None:
    from safetensors import safe_open
    path = directory / TRAINER_STATE
    if not path.is_file():
        return
    with safe_open(path, "pt") as f:
        if f.metadata().get("step") != str(step):
            return  # the run was killed between files: keep the weights, restart the moments
        for name, p in params.items():
            opt.state[p] = {"step": torch.tensor(float(step)),
                            "exp_avg": f.get_tensor(f"{name}.exp_avg"),
                            "exp_avg_sq": f.get_tensor(f"{name}.exp_avg_sq")}


def train(model: FromageModel, examples: list[Example], cfg: TrainConfig, out, *,
          feature_cache=None, progress: bool = True, log=print) -> dict:
    """Train (or resume training) into checkpoint folder `out`; returns the last losses."""
    from tqdm import tqdm
    if not examples:
        raise FromageError("no training examples")
    out = Path(out)
    params = dict(model.learned_state())
    names = {p: n for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    start = 0
    if (out / "config.json").is_file():
        meta = model.load_learned(out)
        start = int(meta.get("step", 0))
        _load_trainer(out, opt, params, start)
        log(f"resuming from {out} at step {start}")

    features = image_features(model, examples, feature_cache, progress)
    captions = [model.tokenizer.backend_tokenizer.encode(e.caption, add_special_tokens=False).ids
                for e in examples]
    model.train()
    model.lm.eval(), model.encoder.eval()  # frozen parts keep eval behaviour (no dropout)
    losses = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        idx = rng.choice(len(examples), size=min(cfg.batch_size, len(examples)), replace=False)
        out_losses = batch_losses(model, features[idx], [captions[i] for i in idx], cfg, rng)
        for group in opt.param_groups:  # linear warm-up, then constant (the reference's schedule)
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        opt.zero_grad(set_to_none=True)
        out_losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        losses = {k: float(v.detach()) for k, v in out_losses.items()}
        bar.set_postfix(loss=f"{losses['loss']:.3f}", nce=f"{losses['contrastive']:.3f}")
        done = step + 1
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save_trainer(out.mkdir(parents=True, exist_ok=True) or out, opt, names, done)
            model.save_checkpoint(out, extra={"step": done, "train": asdict(cfg), "losses": losses})
    model.eval()
    return losses
