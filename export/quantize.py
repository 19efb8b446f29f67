"""Weight quantization for the fused decoder: linear layers as ONNX Runtime `MatMulNBits`.

The default LM came as a GGUF whose linear layers are Q4_1 (per 32 weights: w = d*q + m, q in
0..15, d and m fp16) and whose tied embedding / lm_head is Q8_0 (w = d*q, q in -127..127). Its
fp32 weights therefore lie exactly on those grids, and we recover them (and check every weight
reproduces bit for bit) instead of re-quantizing: the 4-bit bundle holds the very weights the
fp32 bundle computes with. Weights on no grid are quantized round-to-nearest, symmetric.

MatMulNBits dequantizes as (q - zero_point) * d with an integer zero point, so Q4_1's float
offset m is carried separately: with the default zero point 8,
    x . w_block = d * (x . (q - 8)) + (m + 8d) * sum(x_block),
the second term being a small fp32 Gemm over per-block sums of x.

Activations: `int8` (accuracy_level 4, the fast path: activations are quantized per block of 32,
which moves logits by ~3% and lets greedy output drift from fp32) or `fp32` (accuracy_level 1: the
same logits as the fp32 bundle to ~1e-4; on AVX2 CPUs MLAS runs this path only ~1.2x faster than fp32
MatMuls, and its 8-bit kernel is far slower, so lm_head stays fp32 there).
"""
from __future__ import annotations

import numpy as np

from .llama_graph import fp32_linear

BLOCK = 32
ACCURACY_LEVEL = {"int8": 4, "fp32": 1}
MS = "com.microsoft"


def _fp16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16).astype(np.float32)


def q4_1_grid(w: np.ndarray):
    """(q uint8 (N,K), d (N,nb), m (N,nb)) if every row of w (N,K) lies exactly on a Q4_1 grid, else None."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK)
    m = b.min(-1)
    d = _fp16((b.max(-1) - m) / 15)
    safe = np.where(d == 0, 1, d)[..., None]
    q = np.clip(np.rint((b - m[..., None]) / safe), 0, 15)
    if not (np.array_equal(_fp16(m), m) and np.array_equal(d[..., None] * q + m[..., None], b)):
        return None
    return q.astype(np.uint8).reshape(n, k), d, m


def q8_0_rows(w: np.ndarray):
    """(q int8 (N,K), d (N,nb), exact rows (N,) bool): rows of w on a Q8_0 grid reproduce exactly."""
    n, k = w.shape
    b = w.reshape(n, k // BLOCK, BLOCK)
    d = _fp16(np.abs(b).max(-1) / 127)
    safe = np.where(d == 0, 1, d)[..., None]
    q = np.clip(np.rint(b / safe), -127, 127)
    exact = (d[..., None] * q == b).all(axis=(1, 2))
    return q.astype(np.int8).reshape(n, k), d, exact


def symmetric(w: np.ndarray, bits: int):
    """Round-to-nearest symmetric quantization per block: (q as signed ints (N,K), d (N,nb)).
    d is an fp16 value, as in GGUF (the native engine stores block scales in fp16)."""
    n, k = w.shape
    top = 2 ** (bits - 1) - 1
    b = w.reshape(n, k // BLOCK, BLOCK)
    d = _fp16(np.abs(b).max(-1) / top)
    q = np.clip(np.rint(b / np.where(d == 0, 1, d)[..., None]), -top - 1, top)
    return q.astype(np.int8).reshape(n, k), d.astype(np.float32)


def _pack(q_unsigned: np.ndarray, bits: int) -> np.ndarray:
    """(N,K) values in 0..2^bits-1 -> MatMulNBits' B layout (N, K/BLOCK, BLOCK*bits/8) uint8."""
    n, k = q_unsigned.shape
    q = q_unsigned.astype(np.uint8)
    if bits == 4:
        q = q[:, 0::2] | (q[:, 1::2] << 4)
    return q.reshape(n, k // BLOCK, BLOCK * bits // 8)


class Quantizer:
    """The `linear` callback of llama_graph.build_decoder for --quantize int4 / int8.
    `report` counts how each matrix was stored."""

    def __init__(self, bits: int, activations: str = "int8"):
        if bits not in (4, 8) or activations not in ACCURACY_LEVEL:
            raise ValueError((bits, activations))
        self.bits, self.activations, self.report = bits, activations, {}

    def _nbits(self, g, x, name, q_unsigned, d, bits):
        n, k = q_unsigned.shape
        return g.op("MatMulNBits", [x, g.const(name + ".qweight", _pack(q_unsigned, bits)),
                                    g.const(name + ".scales", d.reshape(-1).astype(np.float32))],
                    domain=MS, K=k, N=n, bits=bits, block_size=BLOCK,
                    accuracy_level=ACCURACY_LEVEL[self.activations])

    def __call__(self, g, x, name, w):
        if w.shape[1] % BLOCK:
            self._count("fp32 (K not a multiple of 32)")
            return fp32_linear(g, x, name, w)
        if name == "lm_head" and self.activations == "fp32":
            self._count("fp32 (lm_head with fp32 activations)")
            return fp32_linear(g, x, name, w)
        if name == "lm_head" or self.bits == 8:
            return self._eight_bit(g, x, name, w)
        grid = q4_1_grid(w)
        if grid is not None:
            return self._q4_1(g, x, name, *grid)
        q, d = symmetric(w, 4)
        self._count("int4 re-quantized (symmetric)")
        return self._nbits(g, x, name, q.astype(np.int16) + 8, d, 4)

    def _q4_1(self, g, x, name, q, d, m):
        self._count("int4 Q4_1 grid reused exactly")
        n, k = q.shape
        y = self._nbits(g, x, name, q, d, 4)  # = sum_b d_b * x_b . (q_b - 8)
        blocks = g.op("Reshape", [x, g.const(f"{name}.block_shape", np.array([0, 0, k // BLOCK, BLOCK], np.int64))])
        sums = g.op("ReduceSum", [blocks, g.const(f"{name}.axis", np.array([-1], np.int64))], keepdims=0)
        offsets = (m + 8 * d).T.astype(np.float32)  # (nb, N)
        return g.op("Add", [y, g.op("MatMul", [sums, g.const(f"{name}.offsets", offsets)])])

    def _eight_bit(self, g, x, name, w):
        """The Q8_0 grid where the rows lie on it (the embedding) and those that do not are a few at
        the end (the learned [RET] row, kept fp32); otherwise round-to-nearest."""
        q, d, exact = q8_0_rows(w)
        n_exact = len(exact) if exact.all() else int(np.argmin(exact))  # the leading run of exact rows
        if n_exact > 0 and n_exact >= len(exact) - 16:
            self._count(f"int8 Q8_0 grid reused exactly ({len(exact) - n_exact} extra rows fp32)")
            y = self._nbits(g, x, name, q[:n_exact].astype(np.int16) + 128, d[:n_exact], 8)
            if n_exact == len(exact):
                return y
            return g.op("Concat", [y, fp32_linear(g, x, name + ".extra_rows", w[n_exact:])], axis=-1)
        q, d = symmetric(w, 8)
        self._count("int8 re-quantized (symmetric)")
        return self._nbits(g, x, name, q.astype(np.int16) + 128, d, 8)

    @property
    def exact_weights(self) -> bool:
        """Every matrix kept its exact values (grids reused, or fp32)."""
        return all("re-quantized" not in how for how in self.report)

    @property
    def lossless(self) -> bool:
        """Exact weights, and ONNX Runtime keeps the activations fp32."""
        return self.activations == "fp32" and self.exact_weights

    def _count(self, how):
        self.report[how] = self.report.get(how, 0) + 1
