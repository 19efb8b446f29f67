"""The retrieval objective from cached frozen states: the fast path of training.

The LM is frozen and `[prefix] text` contains no learned token, so its KV cache, its last hidden
states and its next-token logits never change during training. Computed once, they reduce each
step's retrieval objective to the LM pass of the single `[RET]` position (whose input row is
learned) plus the `[RET]` column of the logits — the same losses as `train.retrieval_losses`,
at a fraction of the cost, which makes large contrastive batches affordable on a CPU.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .model import FromageModel
from .train import contrastive_loss, retrieval_ids


class FrozenTextStates:
    def __init__(self, model: FromageModel, texts: list[list[int]], batch_size: int = 64, progress: bool = True):
        """`texts`: the token ids each example puts before [RET] (one layout, `train.retrieval_layouts`)."""
        self.n_prefix = len(model.prefix)
        seqs = [retrieval_ids(model, t)[:-1] for t in texts]  # everything before [RET]
        self.lengths = torch.tensor([len(s) for s in seqs])
        self.keys, self.values, self.hidden, self.base_lse, self.next_logit = [], [], [], [], []
        head = model.lm.get_output_embeddings()
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))  # similar lengths: little padding
        slots: list = [None] * len(seqs)
        bar = tqdm(total=len(seqs), desc="caching frozen text states", disable=not progress)
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                batch = order[start:start + batch_size]
                n = max(len(seqs[i]) for i in batch)
                ids = torch.zeros(len(batch), n, dtype=torch.long)
                mask = torch.zeros(len(batch), n, dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(seqs[i])], mask[row, : len(seqs[i])] = torch.tensor(seqs[i]), 1
                out = model.lm.base_model(inputs_embeds=model.embed_tokens(ids), attention_mask=mask, use_cache=True)
                logits = head(out.last_hidden_state)
                logits[..., model.ret_id] = -torch.inf  # the learned column is added per step
                lse = torch.logsumexp(logits, dim=-1)
                nxt = logits[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
                layers = out.past_key_values.layers
                for row, i in enumerate(batch):
                    length = len(seqs[i])
                    slots[i] = ([layer.keys[row, :, :length].clone() for layer in layers],
                                [layer.values[row, :, :length].clone() for layer in layers],
                                out.last_hidden_state[row, :length].clone(), lse[row, :length].clone(),
                                nxt[row, : length - 1].clone())
                bar.update(len(batch))
        bar.close()
        self.keys, self.values, self.hidden, self.base_lse, self.next_logit = map(list, zip(*slots))

    def _pad(self, tensors: list[torch.Tensor], n: int, dim: int) -> torch.Tensor:
        return torch.stack([F.pad(t, [0, 0] * (t.dim() - dim - 1) + [0, n - t.shape[dim]]) for t in tensors])

    def ret_hidden(self, model: FromageModel, idx: list[int]) -> torch.Tensor:
        """(len(idx), H) last hidden state at the [RET] after the texts `idx`: the only LM position that runs."""
        from transformers.cache_utils import DynamicCache
        lengths = self.lengths[idx]
        n, b = int(lengths.max()), len(idx)
        cache = DynamicCache()
        for layer in range(len(self.keys[0])):
            cache.update(self._pad([self.keys[i][layer] for i in idx], n, 1),
                         self._pad([self.values[i][layer] for i in idx], n, 1), layer)
        mask = torch.cat([(torch.arange(n)[None] < lengths[:, None]).long(), torch.ones(b, 1, dtype=torch.long)], 1)
        emb = model.ret_embedding.view(1, 1, -1).expand(b, 1, -1)
        out = model.lm.base_model(inputs_embeds=emb, attention_mask=mask, position_ids=lengths[:, None],
                                  past_key_values=cache)
        return out.last_hidden_state[:, 0]

    def losses(self, model: FromageModel, idx: list[int], image_emb: torch.Tensor):
        """(next-token loss on `text [RET]`, InfoNCE) for the texts `idx` and their images."""
        nce = contrastive_loss(model.logit_scale, model.text_embedding(self.ret_hidden(model, idx)), image_emb)
        return self.ret_ce(model, idx), nce

    def ret_ce(self, model: FromageModel, idx: list[int]) -> torch.Tensor:
        """The next-token loss on `text [RET]` for the texts `idx`: only the [RET] column of the logits
        depends on learned weights."""
        lengths = self.lengths[idx]
        n = int(lengths.max())
        hidden = self._pad([self.hidden[i] for i in idx], n, 0)
        z = model.ret_logit(hidden)
        lse = torch.logaddexp(self._pad([self.base_lse[i] for i in idx], n, 0), z)
        pos = torch.arange(n)[None]
        is_token = (pos >= self.n_prefix - 1) & (pos < lengths[:, None] - 1)
        is_ret = pos == lengths[:, None] - 1
        nxt = F.pad(self._pad([self.next_logit[i] for i in idx], n - 1, 0), [0, 1])
        loss = torch.where(is_token, lse - nxt, 0.0).sum() + torch.where(is_ret, lse - z, 0.0).sum()
        return loss / (is_token.sum() + is_ret.sum())


def cached_ret_hidden(model: FromageModel, texts: list[list[int]], batch_size: int = 32,
                      progress: bool = True, log=print) -> torch.Tensor:
    """(N, H) last hidden state at the [RET] after each text (token ids), with the model's [RET] input row
    as it is now, cached on disk (cache_root()/ret_hidden/<key>.pt; the key hashes the LM, the [RET] row
    and the texts). With the [RET] input row frozen these states never change, so the retrieval objective
    on many extra texts (`TrainConfig.freeze_ret_embedding`) is a linear map on cached vectors."""
    import hashlib
    from .backbones import cache_root
    from .heldout import ret_hidden
    h = hashlib.sha256(f"{model.config.lm}|{model.prefix}|{model.ret_id}".encode())
    h.update(model.ret_embedding.detach().float().contiguous().numpy().tobytes())
    for t in texts:
        h.update((",".join(map(str, t)) + ";").encode())
    path = cache_root() / "ret_hidden" / f"{h.hexdigest()[:24]}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))  # similar lengths: little padding
    out = torch.zeros(len(texts), model.hidden_dim)
    for start in tqdm(range(0, len(order), batch_size), desc="[RET] states", disable=not progress):
        idx = order[start:start + batch_size]
        out[idx] = ret_hidden(model, [texts[i] for i in idx], batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(out, tmp)
    tmp.replace(path)
    return out
