"""The training loop: captioning + retrieval objectives on image-caption pairs.

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
from .data import FeatureCache
from fromage.runtime.sources import Example
from .encoders import ImageEncoder
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
    caption_batch_size: int = 0      # captioning uses the first N of each batch (0 = all)
    fast_retrieval: bool = True      # retrieval objective from cached frozen states (same losses)
    seed: int = 0
    save_every: int = 200
    eval_every: int = 0              # held-out recall every N steps; the best is kept in out/best
    caption_weight: float = 1.0      # weight of the captioning loss in the sum
    # [RET]'s input row stays at its initialisation: its state after a text never changes, so the retrieval
    # objective runs on cached states (`frozen_text.cached_ret_hidden`) and can use the extra examples too
    freeze_ret_embedding: bool = False
    extra_fraction: float = 0.5      # share of each batch drawn from the extra examples (when there are some)
    prompt_prob: float = 0.0         # captioning: share of pairs written as an answer to a prompt (PROMPTS)


def image_features(encoder: ImageEncoder, examples: list[Example], cache_dir=None, progress=True,
                   log=print) -> tuple[torch.Tensor, list[Example]]:
    """Frozen features of the examples' images (cached on disk) -> (features, kept examples).
    An unreadable image is dropped with a warning (cached as NaN, so it is not retried)."""
    cache = FeatureCache(cache_dir or cache_root() / "features", encoder.fingerprint())

    @torch.no_grad()
    def encode(paths):
        return encoder(torch.from_numpy(preprocess(paths, encoder.preprocessing))).numpy()

    def compute(paths):
        try:
            return encode(paths)
        except FromageError:
            rows = []
            for p in paths:
                try:
                    rows.append(encode([p])[0])
                except FromageError as e:
                    log(f"warning: skipping an image: {e}")
                    rows.append(np.full(encoder.dim, np.nan, dtype=np.float32))
            return np.stack(rows)
    feats = torch.from_numpy(cache.get_many([e.image for e in examples], compute, progress=progress))
    ok = ~torch.isnan(feats).any(dim=1) if len(examples) else torch.zeros(0, dtype=torch.bool)
    if not ok.all():
        log(f"{int((~ok).sum())} of {len(examples)} images could not be read and are left out")
    return feats[ok], [e for e, keep in zip(examples, ok.tolist()) if keep]


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


# Captioning as an answer: (text after the image, how the caption is written after it). "lower": the caption
# with its first letter in lower case after an article; the Q/A layout is runtime/chat.py's. Only the answer is scored.
PROMPTS = [("This is a picture of", " {lower}"), ("Q: What is this?\nA:", " {caption}"),
           ("Q: What is in the picture?\nA:", " {caption}"), ("The picture shows", " {lower}"),
           ("Q: What do you see?\nA: I see", " {lower}"), ("Q: Describe the image.\nA:", " {caption}")]


def _prompted(tok, caption: str, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of a caption written as the answer to a random PROMPTS entry."""
    prompt, answer = PROMPTS[rng.integers(len(PROMPTS))]
    text = caption.strip()
    lower = text[:1].lower() + text[1:] if text.split(" ", 1)[0] in ("A", "An", "The", "Our") else text
    return (tok.encode(prompt, add_special_tokens=False).ids,
            tok.encode(answer.format(caption=text, lower=lower), add_special_tokens=False).ids)


def caption_loss(model: FromageModel, features: torch.Tensor, captions: list[list[int]],
                 cfg: TrainConfig, rng: np.random.Generator, texts: list[str] | None = None) -> torch.Tensor:
    """Next-token loss on `[prefix] [k visual tokens] caption` (sometimes two pairs in a row); with `texts` (the
    captions as text), `cfg.prompt_prob` of the pairs are `[visual tokens] prompt answer` instead (PROMPTS)."""
    prefix = model.embed_tokens(torch.tensor(model.prefix, dtype=torch.long))
    prefix_labels = torch.full((len(prefix),), -100, dtype=torch.long)
    k, b = model.config.k, len(captions)
    vis = model.visual_tokens(features)
    cap_ids = [torch.tensor(c[: cfg.max_caption_tokens], dtype=torch.long) for c in captions]
    ask = [texts is not None and cfg.prompt_prob > 0 and rng.random() < cfg.prompt_prob for _ in range(b)]

    def piece(i):
        if ask[i]:
            prompt, answer = _prompted(model.tokenizer.backend_tokenizer, texts[i], rng)
            prompt, answer = torch.tensor(prompt), torch.tensor(answer[: cfg.max_caption_tokens])
            return (torch.cat([vis[i], model.embed_tokens(prompt), model.embed_tokens(answer)]),
                    torch.cat([torch.full((k + len(prompt),), -100, dtype=torch.long), answer]))
        return (torch.cat([vis[i], model.embed_tokens(cap_ids[i])]),
                torch.cat([torch.full((k,), -100, dtype=torch.long), cap_ids[i]]))

    seqs, labs = [], []
    for i in range(b):
        pieces = [piece(i)]
        if b > 1 and not ask[i] and rng.random() < cfg.concat_prob:
            pieces.append(piece((i + 1) % b))
        seqs.append(torch.cat([prefix] + [p[0] for p in pieces]))
        labs.append(torch.cat([prefix_labels] + [p[1] for p in pieces]))
    emb, mask, lab = _pad(seqs, labs)
    _, logits = model.forward_lm(emb, mask)
    return _lm_loss(logits, lab)


def retrieval_layouts(model: FromageModel, caption: list[int], cfg: TrainConfig) -> list[list[int]]:
    """The texts the retrieval objective puts before [RET], as token ids: the caption (a long one keeps
    its first `max_caption_tokens - 1` tokens) and, when the model has a query template, that caption
    written in it -- the layout `fromage retrieve` and `fromage eval` use for text queries, while
    contexts (a dialogue, the model's own answer) are followed by [RET] as they are."""
    caption = caption[: cfg.max_caption_tokens - 1]
    if model.config.query_template == "{}":
        return [caption]
    tok = model.tokenizer.backend_tokenizer
    return [caption, tok.encode(model.query_text(tok.decode(caption)), add_special_tokens=False).ids]


def retrieval_ids(model: FromageModel, text: list[int]) -> list[int]:
    """`[prefix] text [RET]`."""
    return model.prefix + text + [model.ret_id]


def contrastive_loss(logit_scale: torch.Tensor, text_emb: torch.Tensor, image_emb: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE (text->image and image->text, averaged); the learned scale is capped at 100."""
    scale = logit_scale.clamp(max=math.log(100)).exp()
    sim = scale * text_emb @ image_emb.T
    target = torch.arange(len(sim))
    return (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target)) / 2


def retrieval_losses(model: FromageModel, features: torch.Tensor, texts: list[list[int]]
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(next-token loss on `text [RET]`, InfoNCE between W_t(h_[RET]) and W_i(image)) for one layout's
    texts, by a full forward pass. `FrozenTextStates` computes the same from cached frozen states, much faster."""
    n_prefix = len(model.prefix)
    ret_ids = [torch.tensor(retrieval_ids(model, t)) for t in texts]
    seqs = [model.embed_tokens(ids) for ids in ret_ids]
    labs = [torch.cat([torch.full((n_prefix,), -100, dtype=torch.long), ids[n_prefix:]]) for ids in ret_ids]
    emb, mask, lab = _pad(seqs, labs)
    hidden, logits = model.forward_lm(emb, mask)
    ret_pos = torch.tensor([len(ids) - 1 for ids in ret_ids])
    text = model.text_embedding(hidden[torch.arange(len(texts)), ret_pos])
    return _lm_loss(logits, lab), contrastive_loss(model.logit_scale, text, model.image_embedding(features))


def batch_losses(model: FromageModel, features: torch.Tensor, captions: list[list[int]],
                 cfg: TrainConfig, rng: np.random.Generator, states=None, ids=None) -> dict[str, torch.Tensor]:
    """The reference recipe on one batch (its examples' features and captions): captioning on the first
    `cfg.caption_batch_size` + retrieval (next-token + InfoNCE) on all, summed over the retrieval
    layouts. Given `states` (FrozenTextStates of the training texts, one per layout) and the examples'
    `ids`, retrieval comes from there."""
    n_cap = cfg.caption_batch_size or len(captions)
    cap = caption_loss(model, features[:n_cap], captions[:n_cap], cfg, rng)
    image = model.image_embedding(features)
    if states is not None:
        pairs = [st.losses(model, ids, image) for st in states]
    else:
        layouts = list(zip(*[retrieval_layouts(model, c, cfg) for c in captions]))
        pairs = [retrieval_losses(model, features, list(texts)) for texts in layouts]
    ret_ce, nce = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return {"caption": cap, "ret_ce": ret_ce, "contrastive": nce, "loss": cfg.caption_weight * cap + ret_ce + nce}


@torch.no_grad()
def _ret_hidden(model: FromageModel, layouts: list[list[list[int]]], states=None, batch: int = 64) -> torch.Tensor:
    """The [RET] hidden states of every layout's texts (from the cached states when there are some)."""
    if states is None:
        from .heldout import ret_hidden
        return torch.cat([ret_hidden(model, texts) for texts in layouts])
    return torch.cat([st.ret_hidden(model, list(range(i, min(i + batch, len(texts)))))
                      for st, texts in zip(states, layouts) for i in range(0, len(texts), batch)])


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


def _mixed_losses(model: FromageModel, cfg: TrainConfig, rng, features, captions, n_main: int, states,
                  hidden, texts=None) -> dict[str, torch.Tensor]:
    """One batch when there are extra examples (indices >= n_main of `features`/`captions`) or [RET]'s input
    row is frozen: `cfg.extra_fraction` of the retrieval batch (when frozen) and of the captioning batch
    come from the extra examples; the [RET] next-token loss is on the main examples' cached states,
    InfoNCE on `hidden` (cached [RET] states of every example, one per layout) or, unfrozen, on `states`."""
    n_extra = len(captions) - n_main
    b = min(cfg.batch_size, n_main + (n_extra if hidden is not None else 0))
    n_e = min(n_extra, round(b * cfg.extra_fraction)) if hidden is not None and n_extra else 0
    main = rng.choice(n_main, size=min(n_main, b - n_e), replace=False)
    idx = np.concatenate([main, n_main + rng.choice(n_extra, size=n_e, replace=False)]).astype(int) if n_e else main
    n_cap = cfg.caption_batch_size or len(idx)
    c_e = min(n_extra, round(n_cap * cfg.extra_fraction)) if n_extra else 0
    cap_idx = np.concatenate([rng.choice(n_main, size=min(n_main, n_cap - c_e), replace=False),
                              n_main + rng.choice(n_extra, size=c_e, replace=False)]).astype(int) if c_e else main[:n_cap]
    cap = caption_loss(model, features[cap_idx], [captions[i] for i in cap_idx], cfg, rng,
                       [texts[i] for i in cap_idx] if texts is not None else None)
    image = model.image_embedding(features[idx])
    if hidden is not None:
        ret_ce = sum(st.ret_ce(model, main.tolist()) for st in states)
        nce = sum(contrastive_loss(model.logit_scale, model.text_embedding(h[idx]), image) for h in hidden)
    else:
        pairs = [st.losses(model, main.tolist(), image) for st in states]
        ret_ce, nce = sum(p[0] for p in pairs), sum(p[1] for p in pairs)
    return {"caption": cap, "ret_ce": ret_ce, "contrastive": nce, "loss": cfg.caption_weight * cap + ret_ce + nce}


def train(model: FromageModel, examples: list[Example], cfg: TrainConfig, out, *,
          heldout: list[Example] | None = None, extra: list[Example] | None = None,
          extra_captions: dict[str, str] | None = None, feature_cache=None, progress: bool = True,
          log=print) -> dict:
    """Train (or resume training) into checkpoint folder `out`; returns the last losses.
    With `heldout` (a validation split) and `cfg.eval_every`, its retrieval recall and how often greedy
    captions name the object are measured periodically and the best checkpoint so far is kept in `out/best`.
    `extra`: more examples for captioning (captioned by `extra_captions[image]` when given) and, with
    `cfg.freeze_ret_embedding`, for retrieval."""
    from tqdm import tqdm
    from .heldout import retrieval_recall
    if not examples:
        raise FromageError("no training examples")
    out = Path(out)
    params = dict(model.learned_state())
    if cfg.freeze_ret_embedding:
        params.pop("ret_embedding")
    names = {p: n for n, p in params.items()}
    opt = torch.optim.AdamW(params.values(), lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=0.0)
    start, best = 0, None
    if (out / "config.json").is_file():
        meta = model.load_learned(out)
        start = int(meta.get("step", 0))
        _load_trainer(out, opt, params, start)
        if (out / "best" / "config.json").is_file():
            best = json.loads((out / "best" / "config.json").read_text()).get("heldout")
        log(f"resuming from {out} at step {start}")

    features, examples = image_features(model.encoder, examples, feature_cache, progress, log)
    eval_set = None
    if heldout and cfg.eval_every:
        heldout_features, heldout = image_features(model.encoder, heldout, feature_cache, progress, log)
        eval_set = (heldout, heldout_features)
    encode = model.tokenizer.backend_tokenizer.encode
    captions = [encode(e.caption, add_special_tokens=False).ids for e in examples]
    layouts = [list(texts) for texts in zip(*[retrieval_layouts(model, c, cfg) for c in captions])]
    n_main, hidden = len(examples), None
    mixed = bool(extra) or cfg.freeze_ret_embedding or cfg.prompt_prob > 0
    texts = [e.caption for e in examples]
    if extra:
        extra_features, extra = image_features(model.encoder, extra, feature_cache, progress, log)
        features = torch.cat([features, extra_features])
        extra_ids = [encode(e.caption, add_special_tokens=False).ids for e in extra]
        texts += [(extra_captions or {}).get(e.image, e.caption) for e in extra]
        captions += [encode(t, add_special_tokens=False).ids for t in texts[n_main:]]
    states = None
    if cfg.fast_retrieval or mixed:
        from .frozen_text import FrozenTextStates
        states = [FrozenTextStates(model, texts, progress=progress) for texts in layouts]
    if cfg.freeze_ret_embedding:
        from .frozen_text import cached_ret_hidden
        if extra and cfg.extra_fraction > 0:
            extra_layouts = [list(t) for t in zip(*[retrieval_layouts(model, c, cfg) for c in extra_ids])]
            layouts = [a + b for a, b in zip(layouts, extra_layouts)]
        hidden = [cached_ret_hidden(model, texts, progress=progress, log=log) for texts in layouts]
    if start == 0:  # W_t's input statistics: [RET] states of the training texts, before any step
        model.set_text_statistics(torch.cat(hidden) if hidden is not None else _ret_hidden(model, layouts, states))
    train_settings = asdict(cfg)
    model.train()
    model.lm.eval(), model.encoder.eval()  # frozen parts keep eval behaviour (no dropout)
    losses = {}
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="training", disable=not progress)
    for step in bar:
        rng = np.random.default_rng([cfg.seed, step])
        if mixed:
            out_losses = _mixed_losses(model, cfg, rng, features, captions, n_main, states, hidden, texts)
        else:
            idx = rng.choice(len(examples), size=min(cfg.batch_size, len(examples)), replace=False)
            out_losses = batch_losses(model, features[idx], [captions[i] for i in idx], cfg, rng, states,
                                      idx.tolist())
        for group in opt.param_groups:  # linear warm-up, then constant (the reference's schedule)
            group["lr"] = cfg.lr * min(1.0, (step + 1) / max(1, cfg.warmup))
        opt.zero_grad(set_to_none=True)
        out_losses["loss"].backward()
        torch.nn.utils.clip_grad_norm_(params.values(), cfg.grad_clip)
        opt.step()
        losses = {k: float(v.detach()) for k, v in out_losses.items()}
        bar.set_postfix(loss=f"{losses['loss']:.3f}", nce=f"{losses['contrastive']:.3f}")
        done = step + 1
        meta = {"step": done, "train": train_settings, "losses": losses}
        if eval_set and (done % cfg.eval_every == 0 or done == cfg.steps):
            model.eval()
            recall = retrieval_recall(model, *eval_set, cfg)
            model.train(), model.lm.eval(), model.encoder.eval()
            log(f"step {done}: validation text->image R@1/5/10 = "
                f"{recall['R@1']:.1f} / {recall['R@5']:.1f} / {recall['R@10']:.1f}, image->text R@10 "
                f"{recall['i2t']['R@10']:.1f}, names the object {recall['names']:.1f} %  "
                f"(score {recall['score']:.1f})")
            meta["heldout"] = recall
            if best is None or recall["score"] > best["score"]:
                best = recall
                model.save_checkpoint(out / "best", extra=meta)
        if done % cfg.save_every == 0 or done == cfg.steps:
            _save_trainer(out.mkdir(parents=True, exist_ok=True) or out, opt, names, done)
            model.save_checkpoint(out, extra=meta)
    model.eval()
    return losses
