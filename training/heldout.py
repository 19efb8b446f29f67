"""Held-out retrieval recall during training (PyTorch side; `fromage eval` measures bundles)."""
from __future__ import annotations

import numpy as np
import torch

from fromage.runtime.benchmarks import recall_at_k

from .data import Example
from .model import FromageModel
from .train import TrainConfig, _pad, retrieval_ids


@torch.no_grad()
def text_embeddings(model: FromageModel, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """W_t of the hidden state at `[prefix] caption [RET]`, normalised."""
    tok, cfg, out = model.tokenizer.backend_tokenizer, TrainConfig(), []
    for start in range(0, len(captions), batch_size):
        ids = [retrieval_ids(model, tok.encode(c, add_special_tokens=False).ids, cfg)
               for c in captions[start:start + batch_size]]
        emb, mask, _ = _pad([model.embed_tokens(torch.tensor(i)) for i in ids],
                            [torch.zeros(len(i), dtype=torch.long) for i in ids])
        hidden, _ = model.forward_lm(emb, mask)
        last = torch.tensor([len(i) - 1 for i in ids])
        out.append(model.text_embedding(hidden[torch.arange(len(ids)), last]))
    return torch.cat(out)


def recall_at(scores: torch.Tensor) -> dict:
    """scores (n, n): row i's correct column is i. -> {"R@k": percent}, as `fromage eval` counts."""
    return recall_at_k(scores.numpy(), np.arange(len(scores)))


@torch.no_grad()
def retrieval_recall(model: FromageModel, examples: list[Example], features: torch.Tensor) -> dict:
    text = text_embeddings(model, [e.caption for e in examples])
    image = model.image_embedding(features)
    t2i = recall_at(text @ image.T)
    i2t = recall_at(image @ text.T)
    return {**t2i, "i2t": i2t, "score": t2i["R@1"] + t2i["R@5"] + t2i["R@10"]}
