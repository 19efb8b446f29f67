"""`fromage export --quantize`: GGUF grids recovered exactly, MatMulNBits layouts right, and a
bundle whose weights lie on Q4_1/Q8_0 grids decodes exactly like its fp32 bundle."""
import numpy as np
import pytest
import torch

from fromage.export import quantize as Q


def ggml_q4_1(w: np.ndarray) -> np.ndarray:
    """What a Q4_1 GGUF dequantizes to (ggml's reference quantizer, then d*q + m in fp32)."""
    b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
    mn, mx = b.min(-1, keepdims=True), b.max(-1, keepdims=True)
    d = (mx - mn) / 15
    q = np.minimum(15, ((b - mn) * np.where(d == 0, 0, 1 / np.where(d == 0, 1, d)) + 0.5).astype(np.int8))
    d16, m16 = d.astype(np.float16).astype(np.float32), mn.astype(np.float16).astype(np.float32)
    return (d16 * q + m16).reshape(w.shape)


def ggml_q8_0(w: np.ndarray) -> np.ndarray:
    b = w.reshape(w.shape[0], -1, 32).astype(np.float32)
    d = np.abs(b).max(-1, keepdims=True) / 127
    q = np.rint(b / np.where(d == 0, 1, d))
    return (d.astype(np.float16).astype(np.float32) * q).reshape(w.shape)


def test_grids_are_recovered_bit_for_bit():
    rng = np.random.default_rng(0)
    w = ggml_q4_1(rng.standard_normal((8, 96)).astype(np.float32) * 0.05)
    q, d, m = Q.q4_1_grid(w)
    assert q.max() <= 15 and np.array_equal(np.repeat(d, 32, 1) * q + np.repeat(m, 32, 1), w)
    assert Q.q4_1_grid(w + 1e-4) is None  # off the grid: not reused
    e = ggml_q8_0(rng.standard_normal((8, 64)).astype(np.float32))
    e = np.concatenate([e, rng.standard_normal((1, 64)).astype(np.float32)])  # a learned row at the end
    q8, d8, exact = Q.q8_0_rows(e)
    assert exact[:8].all() and not exact[8]
    assert np.array_equal(np.repeat(d8[:8], 32, 1) * q8[:8], e[:8])


@pytest.mark.parametrize("bits,activations", [(4, "fp32"), (4, "int8"), (8, "int8")])
def test_matmulnbits_layout(bits, activations):
    """One quantized linear in a graph of its own, against numpy on the same dequantized weights."""
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from fromage.export.llama_graph import _Graph
    rng = np.random.default_rng(1)
    w = rng.standard_normal((40, 64)).astype(np.float32) * 0.1
    w = ggml_q4_1(w) if bits == 4 else ggml_q8_0(w)
    qz = Q.Quantizer(bits, activations)
    g = _Graph()
    y = qz(g, "x", "proj", w)
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    graph = helper.make_graph(g.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 64])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(Q.MS, 1)])
    model.ir_version = 10
    x = rng.standard_normal((1, 3, 64)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    want = x @ w.T
    tol = 1e-4 if activations == "fp32" else 3e-2
    assert np.abs(got - want).max() <= tol * np.abs(want).max()
    assert any("exactly" in how for how in qz.report)


def _snap_to_gguf_grids(model):
    """Make the tiny LM look GGUF-born: linear layers on Q4_1 grids, the embedding on Q8_0."""
    with torch.no_grad():
        for name, p in model.lm.named_parameters():
            if name.endswith("proj.weight"):
                p.copy_(torch.from_numpy(ggml_q4_1(p.numpy())))
            elif name.endswith("embed_tokens.weight"):
                p.copy_(torch.from_numpy(ggml_q8_0(p.numpy())))


def test_int4_bundle_from_gguf_grids_decodes_like_fp32(assets, tmp_path):
    from conftest import build_model
    from fromage.export.bundle_writer import write_bundle
    from fromage.runtime.generate import Fromage
    from fromage.runtime.prompt import ImagePart
    from fromage.runtime.sampling import SamplingParams
    model = build_model(assets, "llama", k=2)
    _snap_to_gguf_grids(model)
    write_bundle(model, tmp_path / "fp32", log=lambda *_: None)
    manifest = write_bundle(model, tmp_path / "int4", quantize="int4", activations="fp32", log=lambda *_: None)
    assert manifest["precision"] == "int4" and manifest["parity_max_abs_diff"]["decoder"] < 1e-3
    assert set(manifest["quantization"]) == {"int4 Q4_1 grid reused exactly", "fp32 (lm_head with fp32 activations)"}
    fp32, int4 = Fromage(tmp_path / "fp32"), Fromage(tmp_path / "int4")
    params = SamplingParams(max_new_tokens=16, retrieval=False, stop_ids=[])
    for parts in (["a red cat with a big blue dog"], [ImagePart(assets["images"][1]), "a picture of"]):
        assert int4.generate(parts, params).token_ids == fp32.generate(parts, params).token_ids
    fast = write_bundle(model, tmp_path / "int4-fast", quantize="int4", log=lambda *_: None)
    assert fast["activations"] == "int8" and "int8 Q8_0 grid reused exactly (1 extra rows fp32)" in fast["quantization"]
    assert fast["parity_max_abs_diff"]["decoder_native"] < 1e-3  # exact weights: only 16-bit activations
    assert len(Fromage(tmp_path / "int4-fast", engine="onnxruntime").generate(["a red cat"], params).token_ids) == 16
    # the native engine runs the same 4-bit blocks and the 8-bit head with 16-bit activations: fp32's tokens
    native = Fromage(tmp_path / "int4-fast", engine="native")
    for parts in (["a red cat with a big blue dog"], [ImagePart(assets["images"][1]), "a picture of"]):
        assert native.generate(parts, params).token_ids == fp32.generate(parts, params).token_ids


def test_quantize_refuses_other_architectures(assets, tmp_path):
    from conftest import build_model
    from fromage.export.bundle_writer import write_bundle
    from fromage.runtime.errors import FromageError
    with pytest.raises(FromageError, match="Llama-family"):
        write_bundle(build_model(assets, "opt", k=1), tmp_path / "b", quantize="int4", log=lambda *_: None)
    assert not (tmp_path / "b").exists()


def test_int8_bundle_on_the_native_engine(assets, tmp_path):
    """Every matrix 8-bit (the native engine's 8-bit panels in every layer, not only the head): the native
    decoder's logits match ONNX Runtime's on the same blocks, and greedy decoding agrees."""
    from conftest import build_model
    from fromage.export.bundle_writer import write_bundle
    from fromage.runtime.generate import Fromage
    from fromage.runtime.sampling import SamplingParams
    from fromage.engines.native import NBITS
    model = build_model(assets, "llama", k=2)
    write_bundle(model, tmp_path / "int8", quantize="int8", activations="fp32", log=lambda *_: None)
    native = Fromage(tmp_path / "int8", engine="native")
    assert all(lin.bits == 8 for lin in native.decoder._linears.values() if lin.kind == NBITS)
    assert sum(lin.kind == NBITS for lin in native.decoder._linears.values()) >= 4
    ort = Fromage(tmp_path / "int8", engine="onnxruntime")
    embeds = (np.random.default_rng(0).standard_normal((1, 12, native.embed_dim)) * 0.5).astype(np.float32)
    a, b = native.start(embeds).logits, ort.start(embeds).logits
    assert np.abs(a - b).max() / max(1.0, np.abs(b).max()) < 1e-4  # the same blocks; 16-bit vs fp32 activations
    params = SamplingParams(max_new_tokens=16, retrieval=False, stop_ids=[])
    assert native.generate(["a red cat with a big blue dog"], params).token_ids == \
        ort.generate(["a red cat with a big blue dog"], params).token_ids
