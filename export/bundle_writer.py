"""Write a bundle: the three ONNX graphs, the tokenizer and a manifest, checked against PyTorch.

The bundle is written into a temporary folder next to `out` and renamed into place only after
ONNX Runtime has reproduced the PyTorch outputs, so a failed or killed export never leaves a
bundle that looks valid.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fromage.engines import native
from fromage.runtime.bundle_reader import MANIFEST, BUNDLE_FORMAT
from fromage.runtime.files import sha256_file
from fromage.runtime.generate import cache_capacity
from fromage.runtime.errors import FromageError
from fromage.runtime.prompt import special_prefix
from fromage.training.model import FromageModel

from . import graphs, llama_graph
from .quantize import Quantizer

PARITY_TOLERANCE = 1e-3  # max abs diff, relative to max(1, max |reference|)
# re-quantized weights or 8-bit activations move outputs by a few percent (on random inputs more): only
# gross errors are caught here; what it costs is measured by `fromage eval quantized`
QUANTIZED_TOLERANCE = 0.5
# the native engine on exact 4/8-bit weights: only its 16-bit activations differ from fp32
# (default model, random inputs: 4.6e-4)
NATIVE_QUANTIZED_TOLERANCE = 5e-3


def _ort_session(path):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _diff(ref, got) -> float:
    ref = ref.detach().numpy() if isinstance(ref, torch.Tensor) else ref
    return float(np.abs(ref - got).max() / max(1.0, float(np.abs(ref).max())))


def check_parity(m: FromageModel, folder: Path, io: dict, fused: bool) -> dict:
    """Max (relative) abs diff between ONNX Runtime and PyTorch for each graph, and for the decoder on
    the native engine too where it runs."""
    torch.manual_seed(0)
    out = {}
    s = m.encoder.preprocessing.size
    pixels = torch.randn(2, 3, s, s)
    with torch.no_grad():
        ref = graphs.VisionGraph(m)(pixels)
    got = _ort_session(folder / "vision.onnx").run(None, {"pixel_values": pixels.numpy()})
    out["vision"] = max(_diff(r, g) for r, g in zip(ref, got))

    ids = torch.tensor([[0, m.ret_id, 1, 2]])
    with torch.no_grad():
        ref = graphs.EmbedGraph(m)(ids)
    got = _ort_session(folder / "embed.onnx").run(None, {"input_ids": ids.numpy()})
    out["embed"] = _diff(ref, got[0])

    # decoder: a 5-token prefill from an empty cache, then one token, then 3 more, on ORT's own cache
    dec, sess = graphs.DecoderGraph(m).eval(), _ort_session(folder / "decoder.onnx")
    heads, hd = graphs.cache_shape(m)
    names_in, _ = io["decoder"]
    past = tuple(torch.zeros(1, heads, 0, hd) for _ in range(2 * dec.num_layers))
    buffers = [np.zeros((1, heads, 16, hd), np.float32) for _ in past]  # the fused graph's in-place cache
    diffs, total = [], 0
    engine = None
    if fused and native.available() is None:  # the native engine on the same steps, with a cache of its own
        cfg = m.lm.config
        engine = native.NativeDecoder(folder / "decoder.onnx", {"num_layers": dec.num_layers, "kv_heads": heads,
                                                               "head_dim": hd, "rms_norm_eps": cfg.rms_norm_eps})
        native_cache = [np.zeros((1, heads, cache_capacity(engine, b.shape[2]), hd), np.float32) for b in buffers]
        native_out = [np.zeros((engine.vocab_size,), np.float32), np.zeros((engine.retrieval_dim,), np.float32)]
        native_diffs = []
    for step_len in (5, 1, 3):
        emb = torch.randn(1, step_len, m.embed_dim)
        mask = torch.ones(1, total + step_len, dtype=torch.int64)
        pos = torch.arange(total, total + step_len).unsqueeze(0)
        with torch.no_grad():
            ref = dec(emb, mask, pos, past)
        if fused:
            feeds = {"inputs_embeds": emb.numpy(), "seqlens_k": np.array([total + step_len - 1], np.int32),
                     "total_sequence_length": np.array(total + step_len, np.int32)}
            got = sess.run(None, {**feeds, **dict(zip(names_in[3:], buffers))})
            buffers = got[2:]
            got = got[:2] + [b[:, :, :total + step_len] for b in buffers]
            if engine:
                engine.forward(emb.numpy(), native_cache, total, *native_out)
                mine = [o[None] for o in native_out] + [b[:, :, :total + step_len]
                                                         for b in native.cache_by_position(native_cache)]
                native_diffs += [_diff(r, g) for r, g in zip(ref, mine)]
        else:
            got = sess.run(None, dict(zip(names_in, [emb.numpy(), mask.numpy(), pos.numpy(), *[p.numpy() for p in past]])))
        diffs += [_diff(r, g) for r, g in zip(ref, got)]
        past = ref[2:]
        total += step_len
    out["decoder"] = max(diffs)
    if engine:
        out["decoder_native"] = max(native_diffs)
    return out


def _stop_ids(m: FromageModel) -> list[int]:
    eos = getattr(m.lm.generation_config, "eos_token_id", None)
    if eos is None:
        eos = m.tokenizer.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    return sorted(set(int(e) for e in eos))


def write_bundle(m: FromageModel, out, *, overwrite: bool = False, quantize: str | None = None,
                 activations: str = "int8", log=print) -> dict:
    out = Path(out)
    if out.exists() and not overwrite:
        raise FromageError(f"{out} already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        m.eval()
        io, times = {}, {}
        fused = llama_graph.supports(m.lm)  # Llama-family LMs get the fused in-place-cache graph
        decoder = llama_graph.export_fused_decoder if fused else graphs.export_decoder
        quantizer = None
        if quantize:
            if not fused:
                raise FromageError(f"--quantize needs a Llama-family LM (the fused decoder graph); "
                                   f"{type(m.lm).__name__} is exported in fp32 only")
            quantizer = Quantizer(int(quantize[3:]), activations)
            decoder = partial(llama_graph.export_fused_decoder, linear=quantizer)
        for name, fn in (("vision", graphs.export_vision), ("embed", graphs.export_embed), ("decoder", decoder)):
            t0 = time.perf_counter()
            log(f"exporting {name} graph ...")
            io[name] = fn(m, tmp / f"{name}.onnx")
            times[name] = round(time.perf_counter() - t0, 2)
        m.tokenizer.backend_tokenizer.save(str(tmp / "tokenizer.json"))

        if quantizer:
            log("quantized decoder: " + "; ".join(f"{n} x {how}" for how, n in quantizer.report.items()))
        parity = check_parity(m, tmp, io, fused)
        tolerance = {} if not quantizer else {
            "decoder": PARITY_TOLERANCE if quantizer.lossless else QUANTIZED_TOLERANCE,
            "decoder_native": NATIVE_QUANTIZED_TOLERANCE if quantizer.exact_weights else QUANTIZED_TOLERANCE}
        for name, d in parity.items():
            engine = "native engine" if name.endswith("_native") else "ONNX Runtime"
            log(f"parity {name}: max abs diff ({engine} vs PyTorch, relative) = {d:.2e}")
        bad = {k: v for k, v in parity.items() if not v <= tolerance.get(k, PARITY_TOLERANCE)}
        if bad:
            raise FromageError(f"the compiled graphs disagree with PyTorch beyond tolerance: {bad}; bundle not written")

        cfg = m.lm.config
        heads, head_dim = graphs.cache_shape(m)
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(tmp / "tokenizer.json"))
        manifest = {
            "format": BUNDLE_FORMAT, "version": 1,
            "model": {
                "lm": m.config.lm, "architecture": cfg.architectures[0] if cfg.architectures else type(m.lm).__name__,
                "encoder": m.config.encoder, "encoder_dim": m.encoder.dim,
                "embed_dim": m.embed_dim, "hidden_dim": m.hidden_dim,
                "vocab_size": m.lm.get_output_embeddings().weight.shape[0],
                "num_layers": cfg.num_hidden_layers, "kv_heads": heads, "head_dim": head_dim,
                "max_positions": int(getattr(cfg, "max_position_embeddings", 2048)),
                "k": m.config.k, "retrieval_dim": m.config.retrieval_dim,
                "query_template": m.config.query_template,
                # sha256 of the checkpoint's learned.safetensors (None: fresh heads), so a bundle built
                # from an older shipped default can be recognised
                "checkpoint_sha256": m.checkpoint_sha256,
            },
            "tokens": {"ret": m.ret_id, "ret_text": m.config.ret_token,
                       "prefix": special_prefix(tok), "stop": _stop_ids(m)},
            "preprocessing": m.encoder.preprocessing.to_dict(),
            "precision": quantize or "fp32",
            "activations": activations if quantize else "fp32",
            "quantization": quantizer.report if quantizer else None,
            "graphs": {name: {"file": f"{name}.onnx", "inputs": i, "outputs": o} for name, (i, o) in io.items()},
            "parity_max_abs_diff": parity,
            "export_seconds": times,
        }
        manifest["graphs"]["decoder"]["cache"] = "in-place" if fused else "concat"
        if fused:  # what the native engine needs beyond the graph's weights
            manifest["model"]["rms_norm_eps"] = float(cfg.rms_norm_eps)
        manifest["files"] = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                             for p in sorted(tmp.iterdir()) if p.is_file()}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
