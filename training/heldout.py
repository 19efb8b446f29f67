"""Held-out retrieval recall during training (PyTorch side; `fromage eval` measures bundles)."""
from __future__ import annotations

import torch

from .data import Example
from .model import FromageModel
from .train import TrainConfig, _pad, model_prefix


@torch.no_grad()
def text_embeddings(model: FromageModel, captions: list[str], batch_size: int = 64) -> torch.Tensor:
    """W_t of the hidden state at `[prefix] caption [RET]`, normalised."""
    tok, prefix, out = model.tokenizer.backend_tokenizer, model_prefix(model), []
    max_tokens = TrainConfig.max_caption_tokens
    for start in range(0, len(captions), batch_size):
        ids = [prefix + tok.encode(c, add_special_tokens=False).ids[: max_tokens - 1] + [model.ret_id]
               for c in captions[start:start + batch_size]]
        emb, mask, _ = _pad([model.embed_tokens(torch.tensor(i)) for i in ids],
                            [torch.zeros(len(i), dtype=torch.long) for i in ids])
        hidden, _ = model.forward_lm(emb, mask)
        last = torch.tensor([len(i) - 1 for i in ids])
        out.append(model.text_embedding(hidden[torch.arange(len(ids)), last]))
    return torch.cat(out)


def recall_at(scores: torch.Tensor, ks=(1, 5, 10)) -> dict:
    """scores (n, n): row i's correct column is i. -> {"R@k": percent}."""
    correct = scores.diagonal().unsqueeze(1)
    rank = (scores > correct).sum(1)  # 0 = best
    return {f"R@{k}": float((rank < k).float().mean() * 100) for k in ks}


@torch.no_grad()
def retrieval_recall(model: FromageModel, examples: list[Example], features: torch.Tensor) -> dict:
    text = text_embeddings(model, [e.caption for e in examples])
    image = model.image_embedding(features)
    t2i = recall_at(text @ image.T)
    i2t = recall_at(image @ text.T)
    return {**t2i, "i2t": i2t, "score": t2i["R@1"] + t2i["R@5"] + t2i["R@10"]}
