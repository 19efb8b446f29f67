"""The PyTorch reference decode: the whole sequence is re-run every step (like the published
code's `use_cache=False` loop). It is the ground truth the ONNX runtime is checked against."""
from __future__ import annotations

import numpy as np
import torch

from fromage.runtime.generate import Sequence
from fromage.runtime.preprocess import preprocess
from fromage.runtime.prompt import ImagePart, Part, to_segments
from fromage.runtime.sampling import SamplingParams, adjust_ret_logit, sample

from .model import FromageModel


@torch.no_grad()
def prompt_embeds(model: FromageModel, parts: list[Part]) -> tuple[torch.Tensor, list[int]]:
    segments = to_segments(parts, model.tokenizer.backend_tokenizer, model.prefix)
    chunks, ids = [], []
    for s in segments:
        if isinstance(s, ImagePart):
            pixels = torch.from_numpy(preprocess([s.source], model.encoder.preprocessing))
            chunks.append(model.visual_tokens(model.encode_images(pixels))[0])
        else:
            ids += s
            chunks.append(model.embed_tokens(torch.tensor(s)))
    return torch.cat(chunks).unsqueeze(0), ids


@torch.no_grad()
def reference_generate(model: FromageModel, parts: list[Part], params: SamplingParams,
                       candidates: torch.Tensor | None = None) -> dict:
    """-> {"token_ids": [...], "retrievals": [[top indices into candidates], ...]}.
    `candidates`: (N, R) normalised image embeddings; None disables [RET]."""
    return reference_decode(model, prompt_embeds(model, parts)[0], params, candidates)


@torch.no_grad()
def reference_decode(model: FromageModel, embeds: torch.Tensor, params: SamplingParams,
                     candidates: torch.Tensor | None = None, on_token=None) -> dict:
    """The loop of reference_generate from prompt embeddings (1, n, E); `on_token(token)` is called as
    each token is chosen (the benchmark times them)."""
    stop = set(params.stop_ids or [])
    rng = np.random.default_rng(params.seed)
    tokens, retrievals = [], []
    for step in range(params.max_new_tokens):
        hidden, logits = model.forward_lm(embeds)
        logits = logits[0, -1].numpy().copy()
        adjust_ret_logit(logits, model.ret_id, step, params, params.retrieval and candidates is not None,
                         len(retrievals))
        token = sample(logits, params, rng)
        if token in stop:
            break
        tokens.append(token)
        if on_token:
            on_token(token)
        if retrievals and Sequence.echo_run(tokens, model.ret_id) >= Sequence.ECHO_TOKENS:
            break  # the runtime's rule: after a [RET], an answer that starts re-saying itself ends
        embeds = torch.cat([embeds, model.embed_tokens(torch.tensor([[token]]))], dim=1)
        if token == model.ret_id:
            hidden, _ = model.forward_lm(embeds)
            query = model.text_embedding(hidden[0, -1])
            order = torch.argsort(candidates @ query, descending=True)
            retrievals.append(order[: params.top_images].tolist())
    return {"token_ids": tokens, "retrievals": retrievals}
