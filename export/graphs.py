"""The graphs of a bundle exported from PyTorch modules with the dynamo ONNX exporter: vision, embed,
and the generic decoder, used for LMs that export/llama_graph.py does not write (e.g. OPT); its KV
cache grows by concatenation. `DecoderGraph` is also the PyTorch reference the parity check runs.

  vision : pixel_values (B,3,S,S)                   -> visual_tokens (B,k,E), image_embedding (B,R)
  embed  : input_ids (B,S) int64                    -> inputs_embeds (B,S,E)
  decoder: inputs_embeds (B,S,E), attention_mask (B,P+S), position_ids (B,S),
           past_key_values.{i}.key/value (B,h,P,d) -> logits (B,V) of the last position,
           ret_embedding (B,R) (normalised W_t of the last position), present.{i}.key/value
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.export import Dim

from fromage.training.model import FromageModel

OPSET = 18


class VisionGraph(nn.Module):
    def __init__(self, m: FromageModel):
        super().__init__()
        self.m = m

    def forward(self, pixel_values):
        features = self.m.encoder(pixel_values)
        return self.m.visual_tokens(features), self.m.image_embedding(features)


class EmbedGraph(nn.Module):
    def __init__(self, m: FromageModel):
        super().__init__()
        self.table = m.merged_lm().get_input_embeddings()

    def forward(self, input_ids):
        return self.table(input_ids)


class DecoderGraph(nn.Module):
    def __init__(self, m: FromageModel):
        super().__init__()
        self.lm = m.merged_lm()
        self.W_t = m.retrieval_head()
        self.num_layers = m.lm.config.num_hidden_layers

    def forward(self, inputs_embeds, attention_mask, position_ids, past):
        from transformers.cache_utils import DynamicCache
        cache = DynamicCache()
        for i in range(self.num_layers):
            cache.update(past[2 * i], past[2 * i + 1], i)
        out = self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                 position_ids=position_ids, past_key_values=cache, use_cache=True)
        last = out.last_hidden_state[:, -1]
        logits = self.lm.get_output_embeddings()(last)
        ret = F.normalize(self.W_t(last), dim=-1)
        present = []
        for layer in out.past_key_values.layers:
            present += [layer.keys, layer.values]
        return (logits, ret, *present)


def decoder_io(num_layers: int) -> tuple[list[str], list[str]]:
    kv = [f"{i}.{t}" for i in range(num_layers) for t in ("key", "value")]
    return (["inputs_embeds", "attention_mask", "position_ids"] + [f"past_key_values.{n}" for n in kv],
            ["logits", "ret_embedding"] + [f"present.{n}" for n in kv])


def cache_shape(m: FromageModel) -> tuple[int, int]:
    """(kv heads, head dim) of the LM's attention cache, read from a real forward pass."""
    with torch.no_grad():
        out = m.lm.base_model(inputs_embeds=torch.zeros(1, 1, m.embed_dim), use_cache=True)
    keys = out.past_key_values.layers[0].keys
    return keys.shape[1], keys.shape[3]


def _export(module, args, dynamic_shapes, path, input_names, output_names):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, args, dynamic_shapes=dynamic_shapes, input_names=input_names,
                                    output_names=output_names, opset_version=OPSET, dynamo=True,
                                    external_data=False, verbose=False)
    program.save(str(path))


def export_vision(m: FromageModel, path) -> tuple[list[str], list[str]]:
    io = (["pixel_values"], ["visual_tokens", "image_embedding"])
    s = m.encoder.preprocessing.size
    _export(VisionGraph(m).eval(), (torch.randn(2, 3, s, s),), ({0: Dim("batch")},), path, *io)
    return io


def export_embed(m: FromageModel, path) -> tuple[list[str], list[str]]:
    io = (["input_ids"], ["inputs_embeds"])
    ids = torch.tensor([[1, 2, 3]], dtype=torch.int64)
    _export(EmbedGraph(m).eval(), (ids,), ({0: Dim("batch"), 1: Dim("seq")},), path, *io)
    return io


def export_decoder(m: FromageModel, path) -> tuple[list[str], list[str]]:
    layers = m.lm.config.num_hidden_layers
    heads, head_dim = cache_shape(m)
    b, s, p = 1, 3, 4  # sizes other than 0/1 so the exporter keeps them symbolic
    past = tuple(torch.randn(b, heads, p, head_dim) for _ in range(2 * layers))
    args = (torch.randn(b, s, m.embed_dim), torch.ones(b, p + s, dtype=torch.int64),
            torch.arange(p, p + s).unsqueeze(0), past)
    batch, seq, total, plen = Dim("batch"), Dim("seq"), Dim("total"), Dim("past")
    shapes = ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq},
              tuple({0: batch, 2: plen} for _ in past))
    io = decoder_io(layers)
    _export(DecoderGraph(m).eval(), args, shapes, path, *io)
    return io
