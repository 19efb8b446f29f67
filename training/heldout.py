"""Held-out retrieval recall during training (PyTorch side; `fromage eval` measures bundles)."""
from __future__ import annotations

import numpy as np
import torch

from fromage.runtime.metrics import recall_at_k

from fromage.runtime.sources import Example
from .model import FromageModel
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
def retrieval_recall(model: FromageModel, examples: list[Example], features: torch.Tensor, cfg: TrainConfig) -> dict:
    """Held-out recall (percent), counted as `fromage eval` counts: text->image, and image->text under "i2t"."""
    sim = (text_embeddings(model, [e.caption for e in examples], cfg) @ model.image_embedding(features).T).numpy()
    gt = np.arange(len(sim))
    t2i, i2t = recall_at_k(sim, gt), recall_at_k(sim.T, gt)
    return {**t2i, "i2t": i2t, "score": t2i["R@1"] + t2i["R@5"] + t2i["R@10"]}
