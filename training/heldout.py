"""Held-out retrieval recall during training (PyTorch side; `fromage eval` measures bundles)."""
from __future__ import annotations

import numpy as np
import torch

from fromage.runtime.metrics import recall_at_k

from fromage.runtime.sources import Example
from .model import FromageModel
from .object_names import CAPTION_TOKENS
from .train import TrainConfig, _pad, retrieval_ids, retrieval_layouts


@torch.no_grad()
def ret_hidden(model: FromageModel, texts: list[list[int]], batch_size: int = 64) -> torch.Tensor:
    """(N, H) last hidden state at [RET] of `[prefix] text [RET]` for each text (token ids)."""
    out = []
    for start in range(0, len(texts), batch_size):
        ids = [retrieval_ids(model, t) for t in texts[start:start + batch_size]]
        emb, mask, _ = _pad([model.embed_tokens(torch.tensor(i)) for i in ids],
                            [torch.zeros(len(i), dtype=torch.long) for i in ids])
        hidden, _ = model.forward_lm(emb, mask)
        out.append(hidden[torch.arange(len(ids)), torch.tensor([len(i) - 1 for i in ids])])
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(model: FromageModel, captions: list[str], cfg: TrainConfig) -> torch.Tensor:
    """Normalised W_t embeddings of captions as text queries (in the query template, as `fromage eval`
    writes them; long captions truncated as in training)."""
    tok = model.tokenizer.backend_tokenizer
    texts = [retrieval_layouts(model, tok.encode(c, add_special_tokens=False).ids, cfg)[-1] for c in captions]
    return model.text_embedding(ret_hidden(model, texts))


@torch.no_grad()
def greedy_captions(model: FromageModel, features: torch.Tensor, max_tokens: int = CAPTION_TOKENS,
                    batch_size: int = 64) -> list[str]:
    """Greedy captions of images from `[prefix] [k visual tokens]` ([RET] never chosen), each cut at its
    first newline: what `fromage eval` generates for its "names the object" line."""
    from transformers.cache_utils import DynamicCache
    tok = model.tokenizer
    stop = {i for i in (tok.eos_token_id, tok.pad_token_id) if i is not None}
    prefix = model.embed_tokens(torch.tensor(model.prefix, dtype=torch.long))
    out = []
    for start in range(0, len(features), batch_size):
        vis = model.visual_tokens(features[start:start + batch_size])
        b = len(vis)
        emb = torch.cat([prefix.expand(b, -1, -1), vis], dim=1)
        cache, pos, ids = DynamicCache(), 0, []
        for _ in range(max_tokens):
            n = emb.shape[1]
            h = model.lm.base_model(inputs_embeds=emb, past_key_values=cache, use_cache=True,
                                    position_ids=torch.arange(pos, pos + n).expand(b, -1)).last_hidden_state
            pos += n
            logits = model.lm.get_output_embeddings()(h[:, -1])
            logits[:, model.ret_id:] = -torch.inf  # [RET] (and anything added after it) never chosen
            nxt = logits.argmax(-1)
            ids.append(nxt)
            emb = model.embed_tokens(nxt[:, None])
        for row in torch.stack(ids, 1).tolist():
            cut = next((i for i, t in enumerate(row) if t in stop), len(row))
            out.append(tok.decode(row[:cut]).strip().split("\n")[0].strip())
    return out


@torch.no_grad()
def retrieval_recall(model: FromageModel, examples: list[Example], features: torch.Tensor, cfg: TrainConfig,
                     names: bool = True) -> dict:
    """Recall (percent) on a split, counted as `fromage eval` counts: text->image, and image->text under
    "i2t"; with `names`, the share of images whose greedy caption names the object ("names") and a few
    of those captions. "score" (how checkpoints are chosen): t2i R@10 + i2t R@10 + names."""
    from .object_names import names_share
    sim = (text_embeddings(model, [e.caption for e in examples], cfg) @ model.image_embedding(features).T).numpy()
    gt = np.arange(len(sim))
    t2i, i2t = recall_at_k(sim, gt), recall_at_k(sim.T, gt)
    row = {**t2i, "i2t": i2t}
    if names:
        gen = greedy_captions(model, features)
        row["names"] = names_share((e.caption, g) for e, g in zip(examples, gen))
        row["captions"] = [[e.caption, g] for e, g in list(zip(examples, gen))[:: max(1, len(gen) // 6)]]
    row["score"] = t2i["R@10"] + i2t["R@10"] + row.get("names", 0.0)
    return row
