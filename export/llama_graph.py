"""The decoder graph of a Llama-family LM, written node by node with ONNX Runtime's fused ops.

Why not the generic exporter: this graph is what makes batch-1 decoding run at the memory-bandwidth
limit. Per layer it is two skip-RMSNorms, one packed QKV MatMul, one GroupQueryAttention (rotary
inside, KV cache in a buffer that the runtime binds as both past and present, so nothing is copied
per step), one O MatMul, one packed gate/up MatMul and the down MatMul. Logits are computed for the
last position only.

  inputs : inputs_embeds (B,S,E), seqlens_k (B,) int32 = total length - 1,
           total_sequence_length () int32, past_key_values.{i}.key/value (B,kv,C,d) with C >= total
  outputs: logits (B,V) of the last position, ret_embedding (B,R), present.{i}.key/value (B,kv,C,d)

Linear layers are fp32 MatMuls, or with `quantize` 4/8-bit MatMulNBits (see quantize.py).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fromage.runtime.errors import FromageError

OPSET = 18
MS = "com.microsoft"
SUPPORTED = ("LlamaForCausalLM", "MistralForCausalLM")


def supports(lm) -> bool:
    """True for what this builder writes: Llama layout, full attention, plain RoPE, head_dim % 8 == 0.
    Other LMs get the generic exported graph (export/graphs.py)."""
    cfg = lm.config
    arch = (cfg.architectures or [type(lm).__name__])[0]
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return (arch in SUPPORTED and head_dim % 8 == 0  # GroupQueryAttention's CPU kernel needs it and not getattr(cfg, "attention_bias", False) and not getattr(cfg, "mlp_bias", False)
            and getattr(cfg, "hidden_act", "silu") == "silu" and getattr(cfg, "sliding_window", None) is None
            and not getattr(cfg, "rope_scaling", None) and getattr(cfg, "pretraining_tp", 1) == 1)


def rotary_caches(cfg, positions: int) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin (positions, head_dim/2) as Hugging Face's default RoPE computes them."""
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // cfg.num_attention_heads
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.int64).astype(np.float32) / d))
    freqs = np.outer(np.arange(positions, dtype=np.float32), inv_freq.astype(np.float32))
    return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


class _Graph:
    """Small helper: unique names, initializers, nodes."""

    def __init__(self):
        self.nodes, self.inits, self.n = [], [], 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(array), name))
        return name

    def op(self, op_type: str, inputs: list[str], n_out: int = 1, domain: str = "", outs=None, **attrs):
        self.n += 1
        outs = outs or [f"{op_type.lower()}_{self.n}_{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=f"{op_type}_{self.n}", domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs


def fp32_linear(g: _Graph, x: str, name: str, w: np.ndarray) -> str:
    """The default `linear`: x @ w.T with w (out, in) stored transposed."""
    return g.op("MatMul", [x, g.const(name, w.T)])


def build_decoder(lm, W_t, linear=fp32_linear) -> tuple[onnx.ModelProto, list[str], list[str]]:
    """-> (model, input names, output names). `lm` is the merged LM ([RET] rows written in);
    `W_t` the retrieval head; `linear(g, x, name, weight (out,in))` writes one linear layer
    (default: fp32 MatMul)."""
    if not supports(lm):
        raise FromageError(f"the fused decoder graph supports {', '.join(SUPPORTED)} without biases, "
                           f"sliding windows or RoPE scaling; got {type(lm).__name__}")
    cfg = lm.config
    sd = {k: v.detach().float().numpy() for k, v in lm.state_dict().items()}
    heads, kv, layers = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    d = cfg.head_dim if getattr(cfg, "head_dim", None) else cfg.hidden_size // heads
    E, eps = cfg.hidden_size, float(cfg.rms_norm_eps)
    g = _Graph()

    cos, sin = rotary_caches(cfg, int(cfg.max_position_embeddings))
    g.const("cos_cache", cos), g.const("sin_cache", sin)
    kv_names = [f"{i}.{t}" for i in range(layers) for t in ("key", "value")]
    inputs = ["inputs_embeds", "seqlens_k", "total_sequence_length"] + [f"past_key_values.{n}" for n in kv_names]
    outputs = ["logits", "ret_embedding"] + [f"present.{n}" for n in kv_names]

    def norm(weight_name, x, delta):
        """RMSNorm of the residual stream x (+ delta): -> (normalised, new residual stream)."""
        w = g.const(weight_name, sd[weight_name])
        if delta is None:
            return g.op("SimplifiedLayerNormalization", [x, w], epsilon=eps, axis=-1, stash_type=1), x
        out = g.op("SkipSimplifiedLayerNormalization", [x, delta, w], n_out=4, domain=MS, epsilon=eps)
        return out[0], out[3]

    x, delta = "inputs_embeds", None
    for i in range(layers):
        p = f"model.layers.{i}."
        h, x = norm(p + "input_layernorm.weight", x, delta)
        wqkv = np.concatenate([sd[p + f"self_attn.{t}_proj.weight"] for t in "qkv"], axis=0)
        qkv = linear(g, h, p + "self_attn.qkv_proj", wqkv)
        attn = g.op("GroupQueryAttention", [qkv, "", "", f"past_key_values.{i}.key", f"past_key_values.{i}.value",
                                            "seqlens_k", "total_sequence_length", "cos_cache", "sin_cache"],
                    n_out=3, domain=MS, outs=[f"gqa_{i}", f"present.{i}.key", f"present.{i}.value"],
                    num_heads=heads, kv_num_heads=kv, do_rotary=1, rotary_interleaved=0,
                    scale=float(d ** -0.5), local_window_size=-1)
        delta = linear(g, attn[0], p + "self_attn.o_proj", sd[p + "self_attn.o_proj.weight"])
        h, x = norm(p + "post_attention_layernorm.weight", x, delta)
        gate_up = linear(g, h, p + "mlp.gate_up_proj",
                         np.concatenate([sd[p + "mlp.gate_proj.weight"], sd[p + "mlp.up_proj.weight"]], axis=0))
        gate, up = g.op("Split", [gate_up, g.const(p + "split", np.array([cfg.intermediate_size] * 2, np.int64))],
                        n_out=2, axis=-1)
        act = g.op("Mul", [g.op("Mul", [gate, g.op("Sigmoid", [gate])]), up])
        delta = linear(g, act, p + "mlp.down_proj", sd[p + "mlp.down_proj.weight"])
    h, _ = norm("model.norm.weight", x, delta)

    # the last position only: (B,S,E) -> (B,E)
    last = g.op("Gather", [h, g.const("last_index", np.array(-1, np.int64))], axis=1)
    head = lm.get_output_embeddings().weight.detach().float().numpy()
    logits = linear(g, last, "lm_head", head)
    t = g.op("Add", [g.op("MatMul", [last, g.const("W_t.weight", W_t.weight.detach().numpy().T)]),
                     g.const("W_t.bias", W_t.bias.detach().numpy())])
    norm_t = g.op("Max", [g.op("ReduceL2", [t, g.const("axis_last", np.array([-1], np.int64))], keepdims=1),
                          g.const("norm_eps", np.array(1e-12, np.float32))])
    g.nodes.append(helper.make_node("Identity", [logits], ["logits"]))
    g.nodes.append(helper.make_node("Div", [t, norm_t], ["ret_embedding"]))

    f32, i32 = TensorProto.FLOAT, TensorProto.INT32
    graph_inputs = [helper.make_tensor_value_info("inputs_embeds", f32, ["batch", "seq", E]),
                    helper.make_tensor_value_info("seqlens_k", i32, ["batch"]),
                    helper.make_tensor_value_info("total_sequence_length", i32, [])]
    graph_inputs += [helper.make_tensor_value_info(f"past_key_values.{n}", f32, ["batch", kv, "capacity", d])
                     for n in kv_names]
    graph_outputs = [helper.make_tensor_value_info("logits", f32, ["batch", head.shape[0]]),
                     helper.make_tensor_value_info("ret_embedding", f32, ["batch", W_t.out_features])]
    graph_outputs += [helper.make_tensor_value_info(f"present.{n}", f32, ["batch", kv, "capacity", d])
                      for n in kv_names]
    graph = helper.make_graph(g.nodes, "fromage_decoder", graph_inputs, graph_outputs, g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET), helper.make_opsetid(MS, 1)],
                              producer_name="fromage")
    model.ir_version = 10
    return model, inputs, outputs


def export_fused_decoder(m, path, linear=fp32_linear) -> tuple[list[str], list[str]]:
    model, inputs, outputs = build_decoder(m.merged_lm(), m.retrieval_head(), linear)
    # weights inline: with them in an external file, which ONNX Runtime memory-maps, the same graph
    # used ~200 MB less memory but decoded 15-25 % slower here (`fromage bench`, side by side)
    onnx.save(model, str(path))
    return inputs, outputs
