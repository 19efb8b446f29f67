"""The native decoder engine: the fused Llama decoder's forward pass in C (native/), over the
bundle's own decoder.onnx weights.

Why: batch-1 decoding reads every weight once per token. ONNX Runtime's fp32 MatMul streams them
at ~80 % of this machine's bandwidth, and its 4-bit MatMulNBits is fast only when it rounds the
activations to int8 (which changes greedy output). The C kernels stream fp32 weights at the
bandwidth limit and run the GGUF's 4-bit grids with 16-bit activations (logits within ~1e-5 of fp32
ones), so a 4-bit bundle decodes with exactly the fp32 bundle's weights. The KV cache is the runtime's
(1, kv, capacity, d) buffers, as with the ONNX graph (float32, or float16 here with kv_cache="f16"), laid out
in blocks of positions (native/fromage_native.h): `first_positions` is how the runtime takes a cache's first
positions on either engine.
"""
from __future__ import annotations

import ctypes
import glob
import mmap
import os
import weakref
from pathlib import Path

import numpy as np

from fromage.engines.base import resolve_threads
from fromage.engines.errors import FromageError
from fromage.engines.huge_pages import HUGE_PAGE, Arena
from fromage.engines.onnx_weights import initializers, read_inline

_DTYPES = {1: np.float32, 2: np.uint8}  # the weights; the graphs' int64 shape constants are not needed
F32, NBITS, BLOCK, PANEL, MLP_PARTS = 0, 1, 32, 16, 2  # as in native/fromage_native.h


class _Linear(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int32), ("K", ctypes.c_int32), ("N", ctypes.c_int32), ("bits", ctypes.c_int32),
                ("w", ctypes.c_void_p), ("q", ctypes.c_void_p)]


class _Layer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("mlp_norm", ctypes.c_void_p),
                ("qkv", _Linear), ("o", _Linear), ("gate_up", _Linear * MLP_PARTS), ("down", _Linear * MLP_PARTS)]


class _Model(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int32) for n in ("n_layers", "hidden", "n_heads", "n_kv", "head_dim", "inter",
                                               "rope_positions", "retrieval_dim", "threads")] + [
        ("eps", ctypes.c_float), ("cos", ctypes.c_void_p), ("sin", ctypes.c_void_p),
        ("layers", ctypes.POINTER(_Layer)), ("final_norm", ctypes.c_void_p),
        ("head", _Linear), ("head_extra", _Linear), ("wt", ctypes.c_void_p), ("wt_bias", ctypes.c_void_p),
        ("head_q8", _Linear), ("head_q8_bound", ctypes.c_void_p), ("head_q8_exact", ctypes.c_void_p),
        ("head_q8_n_exact", ctypes.c_int32), ("kv_half", ctypes.c_int32), ("mlp_parts", ctypes.c_int32),
        ("prompt_rows", ctypes.c_int32)]


_TEMPORARY = (".qweight", ".scales", ".offsets")  # read, then repacked for the kernels
_HEADS = ("lm_head", "lm_head.extra_rows", "W_t.weight")  # fp32 matrices besides the layers' *_proj


def _is_f32_matrix(t: dict) -> bool:
    """An fp32 MatMul weight (K, N), which the kernels take in panels of 16 columns (native/fromage_native.h)."""
    return t["dtype"] == 1 and len(t["dims"]) == 2 and (t["name"].endswith("_proj") or t["name"] in _HEADS)


def mlp_parts(inter: int) -> int:
    """The parts the native decoder computes the MLP's inner dimension in (fm_layer): each a whole number of
    4/8-bit blocks, so that a model's fp32 and 4/8-bit bundles sum alike."""
    return MLP_PARTS if inter % (MLP_PARTS * BLOCK) == 0 else 1


_MLP = ("mlp.gate_up_proj", "mlp.down_proj")  # the matrices the native decoder takes in parts (fm_layer)


def _parts(name: str, k: int, n: int) -> list:
    """A matrix (K, N) as the kernels take it: a layer's gate_up as each MLP part's gate | up columns, its down as
    each part's rows (fm_layer) -- [(axis, indices), ...]; [None] for any other matrix (whole)."""
    if name.endswith(_MLP[0]) and n >= 2:
        inter = n // 2
        size = inter // mlp_parts(inter)
        return [(1, np.r_[p:p + size, inter + p:inter + p + size]) for p in range(0, inter, size)]
    if name.endswith(_MLP[1]) and k >= 1:
        size = k // mlp_parts(k)
        return [(0, np.arange(p, p + size)) for p in range(0, k, size)]
    return [None]  # (a degenerate MLP matrix too: the shape check refuses it)


def _pieces(name: str, k: int, n: int) -> list:
    """(K, N) of each of a matrix's parts (_parts)."""
    return [(k, n) if part is None else (len(part[1]), n) if part[0] == 0 else (k, len(part[1]))
            for part in _parts(name, k, n)]


def _panels_bytes(dims) -> int:
    """Bytes of an fp32 matrix (K, N) in panels of 16 columns, the last one zero-padded."""
    k, n = dims
    return 4 * k * -(-n // PANEL) * PANEL


def _nbits_bytes(qweight_dims) -> int:
    """Bytes of a MatMulNBits weight (N, K/32, bytes per block) in the kernels' panels of 16 columns,
    each block's fp16 d and m beside it (native/fromage_native.h)."""
    n, nb, nbytes = qweight_dims
    return -(-n // PANEL) * PANEL * nb * (4 + nbytes)


def library_path() -> Path | None:
    """The built native library: $FROMAGE_NATIVE_LIB, or the one `pip install` compiled next to this file."""
    if os.environ.get("FROMAGE_NATIVE_LIB"):
        return Path(os.environ["FROMAGE_NATIVE_LIB"])
    found = sorted(glob.glob(str(Path(__file__).with_name("_native")) + "*.so"))
    return Path(found[0]) if found else None


_lib = None


def load_library():
    """The native library, or FromageError saying why it cannot be used here."""
    global _lib
    if _lib is None:
        path = library_path()
        if path is None or not path.exists():
            raise FromageError("the native decoder library is not built (pip install -e . compiles it; "
                               "or set FROMAGE_NATIVE_LIB)")
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise FromageError(f"cannot load the native decoder library {path}: {e}") from None
        lib.fm_kernels.restype = ctypes.c_char_p
        lib.fm_set_kernels.argtypes = [ctypes.c_char_p]
        if not lib.fm_cpu_ok():  # only where FROMAGE_KERNELS forces kernels this CPU cannot run
            raise FromageError(f"FROMAGE_KERNELS={os.environ.get('FROMAGE_KERNELS')!r} names kernels this CPU or build "
                               f"cannot run (avx512, avx2 or portable; {kernels_in_use(lib)} would run here)")
        lib.fm_pack.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
        lib.fm_pack_nbits.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int32,
                                      ctypes.c_void_p]
        lib.fm_pack_nbits.restype = ctypes.c_int
        lib.fm_forward.argtypes = [ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int32, ctypes.c_int32,
                                   ctypes.c_int32, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                   ctypes.c_void_p]
        lib.fm_quantize8.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64] + [ctypes.c_void_p] * 3
        lib.fm_quantize8.restype = ctypes.c_int
        lib.fm_forward_rows.argtypes = ([ctypes.POINTER(_Model), ctypes.c_void_p, ctypes.c_int32] + [ctypes.c_void_p] * 4
                                        + [ctypes.c_int32] + [ctypes.c_void_p] * 5)
        lib.fm_core_round_trip.restype, lib.fm_core_round_trip.argtypes = ctypes.c_double, [ctypes.c_int]
        lib.fm_set_streamed_partials.argtypes = [ctypes.c_int]
        lib.fm_profile.argtypes = [ctypes.c_int]
        lib.fm_profile_read.argtypes = [ctypes.c_void_p]
        lib.fm_profile_read.restype = ctypes.c_int64
        _lib = lib
    return _lib


def kernels_in_use(lib=None) -> str:
    """Which copy of the native kernels runs: "avx512", "avx2" or "portable" (chosen at load by what the
    CPU has; FROMAGE_KERNELS forces one)."""
    return (lib or load_library()).fm_kernels().decode()


def available() -> str | None:
    """None when the native decoder can run here, else the reason it cannot."""
    try:
        load_library()
        return None
    except FromageError as e:
        return str(e)


KV_BLOCK = 64  # FM_KV_BLOCK: cache capacities are multiples of it; keys are stored in blocks of it
KV_DTYPES = {"f32": np.float32, "f16": np.float16}  # fm_model.kv_half: the cache's element
OPS = ("norm", "qkv", "rope", "attention", "o", "gate_up", "silu", "down", "head")  # fm_op's order


def cache_by_position(cache: list) -> list:
    """A native KV cache ([key0, value0, key1, ...], each (1, kv, capacity, d)) in position order, the
    layout of the ONNX graph's cache, as reordered copies: the buffers hold blocks of KV_BLOCK positions in
    order, each block its groups' tiles, a key tile dimension-major and a value tile position-major
    (native/fromage_native.h)."""
    def by_position(c, keys):
        _, kv, capacity, d = c.shape
        tiles = c.reshape(capacity // KV_BLOCK, kv, *((d, KV_BLOCK) if keys else (KV_BLOCK, d)))
        return (tiles.transpose(1, 0, 3, 2) if keys else tiles.transpose(1, 0, 2, 3)).reshape(c.shape).copy()
    return [by_position(c, i % 2 == 0) for i, c in enumerate(cache)]


def _raise_for(rc: int, exceeded: str) -> None:
    """A failed native call as a FromageError: -1, positions past the cache or the rotary table (`exceeded` says
    which); any other code, out of memory."""
    raise FromageError(exceeded if rc == -1 else f"the native decoder failed (code {rc}: out of memory)")


class _Buffers:
    """A KV cache's buffers as a call saw them: their addresses, and whether a cache list still holds them, told
    from the arrays' ids while none of them has died (an id is reused only after its object dies; a weak
    reference's callback says so). So a step does not read the 60 array objects, which the last step left
    cache-cold; and a finished request's cache is not kept alive."""
    __slots__ = ("ids", "alive", "refs", "k", "v", "__weakref__")

    def __init__(self, cache: list, addresses: list[int]):
        self.ids, self.alive = tuple(map(id, cache)), True
        self.refs = [weakref.ref(b, self._gone) for b in cache]
        table = ctypes.c_void_p * (len(addresses) // 2)
        self.k, self.v = table(*addresses[0::2]), table(*addresses[1::2])  # the layers' pointer tables

    def _gone(self, _ref) -> None:
        self.alive = False

    def held_by(self, cache: list) -> bool:
        return self.alive and tuple(map(id, cache)) == self.ids


class _OneStep:
    """The arguments of one sequence's one-position calls (NativeDecoder._step, TokenSteps), built when its cache's
    buffers, its logits or its ret change (checked here, once): a decoding loop's step then sets the position, the
    count and the embedding's address, and calls (run)."""
    __slots__ = ("buffers", "logits", "ret", "past", "top", "best", "args", "call", "capacity", "rope")

    def __init__(self, decoder: "NativeDecoder", cache: list, logits: np.ndarray, ret: np.ndarray, known: dict):
        decoder._check_outputs(logits, ret)
        i32, buffers = ctypes.c_int32, decoder._buffers(cache, known)
        self.buffers, self.logits, self.ret = buffers, logits, ret
        self.past, self.top, self.best = i32(), i32(), i32()
        self.call, self.capacity, self.rope = decoder.lib.fm_forward_rows, cache[0].shape[2], decoder.model.rope_positions
        self.args = [ctypes.byref(decoder.model), 0, 1, ctypes.byref(self.past), ctypes.byref(i32(self.capacity)),
                     buffers.k, buffers.v, 1, None, ctypes.byref(self.top), logits.ctypes.data,
                     ret.ctypes.data, ctypes.byref(self.best)]

    def run(self, address: int, past: int, top: int) -> int:
        """Feeds the embedding at `address` at position `past`, wanting its `top` largest logits: forward's best."""
        self.past.value, self.top.value = past, top
        self.args[1] = address
        rc = self.call(*self.args)
        if rc:
            _raise_for(rc, f"{past} + 1 positions exceed the cache ({self.capacity}) or the rotary table ({self.rope})")
        return self.best.value


class TokenSteps(_OneStep):
    """One-position steps of one sequence whose inputs are rows of an embedding table, its tokens' (a decoding loop's
    steps, NativeDecoder.token_steps): the checks of forward, the cache's buffers and the table's address done once,
    so that a step, which follows one that streamed the weights through every cache, runs only the position, the
    count, the row's address and the call. Valid while the same cache list holds the same buffers and the logits and
    ret are the same arrays (`for_`: a buffer that died, replaced in the list, is seen by its weak reference)."""
    __slots__ = ("cache", "table", "base", "row", "rows")

    def __init__(self, decoder: "NativeDecoder", cache: list, logits: np.ndarray, ret: np.ndarray, table: np.ndarray):
        if not (table.dtype == np.float32 and table.flags.c_contiguous and table.ndim == 2
                and table.shape[1] == decoder.model.hidden):
            raise FromageError(f"the embedding table must be C-contiguous float32 (V, {decoder.model.hidden})")
        super().__init__(decoder, cache, logits, ret, {})
        self.cache, self.table = cache, table  # the table kept alive: its rows are read in place
        self.base, self.row, self.rows = table.ctypes.data, 4 * table.shape[1], table.shape[0]

    def for_(self, cache: list, logits: np.ndarray, ret: np.ndarray) -> bool:
        """Whether these are the steps of this cache list, logits and ret, none of its buffers dead."""
        return cache is self.cache and logits is self.logits and ret is self.ret and self.buffers.alive

    def __call__(self, token: int, past: int, top: int) -> int:
        """Feeds token's row of the table at position `past`, wanting its `top` (> 0) largest logits; -> the column
        of the largest but the exact columns' for top 1 (forward's), else -1."""
        if not 0 <= token < self.rows or top < 1:
            raise FromageError(f"token id {token} out of range 0..{self.rows - 1}, or top {top} < 1")
        return self.run(self.base + token * self.row, past, top)


class NativeDecoder:
    """One bundle's fused decoder graph (export/llama_graph.py, fp32 or --quantize) run natively."""
    in_place = True  # writes the KV cache buffers in place (the runtime grows them)
    capacity_step = KV_BLOCK  # a cache's capacity is a multiple of this

    @staticmethod
    def first_positions(buffer: np.ndarray, n: int) -> np.ndarray:
        """A view of a cache buffer's first n positions (n a multiple of KV_BLOCK), shaped (1, kv, n, d): the
        buffer's first elements (its blocks of positions come in order)."""
        _, kv, _, d = buffer.shape
        return buffer.reshape(-1)[:kv * n * d].reshape(1, kv, n, d)

    def __init__(self, path, model: dict, threads: int | None = None, exact_columns: tuple = (), kv_cache: str = "f32"):
        """exact_columns: logits that a row asking for its `top` largest (forward_batch) gets exactly whatever
        their value: a logit the caller rescales before choosing, as the runtime does [RET]'s.
        kv_cache: "f32", or "f16" (the caches this decoder takes hold fp16 halves: half the memory and reads)."""
        if kv_cache not in KV_DTYPES:
            raise FromageError(f"unknown KV cache type {kv_cache!r} (choose from {', '.join(KV_DTYPES)})")
        self.kv_dtype = np.dtype(KV_DTYPES[kv_cache])
        self.lib = load_library()
        self.kernels = kernels_in_use(self.lib)  # "avx512", "avx2" or "portable"
        if "rms_norm_eps" not in model:
            raise FromageError("this bundle predates the native decoder (no rms_norm_eps in its manifest); "
                               "re-export it")
        # read into 64-byte-aligned memory of one arena: used in place from a memory map (arbitrary
        # offsets), the same kernels ran ~15 % slower here (split cache-line loads); read(), not copied
        # from a map, so loading never holds the file's pages and the copies at once. fp32 matrices
        # are read aside and laid out in panels in the arena (_pack), 4/8-bit weights read aside and
        # repacked into it (_repack), one matrix at a time.
        self.w, self._linears = {}, {}  # name -> _Linear: fp32 panels (_pack) or 4/8-bit blocks (_repack)
        self.head_top_bytes, self.head_bound = None, None  # set with the fp32 head's 8-bit copy (_quantize_head)
        with open(path, "rb") as fh:
            with mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                table = [t for t in initializers(buf) if t["dtype"] in _DTYPES]
            self._external = {t["name"] for t in table if t["raw"] is None}
            table = [t for t in table if t["raw"] is not None]
            kept = [t for t in table if not t["name"].endswith(_TEMPORARY)]
            sizes = [_panels_bytes(kn) for t in table if _is_f32_matrix(t) for kn in _pieces(t["name"], *t["dims"])]
            sizes += [_nbits_bytes((kn[1], kn[0] // BLOCK, t["dims"][2])) for t in table
                      if t["name"].endswith(".qweight") and len(t["dims"]) == 3
                      for kn in _pieces(t["name"][:-len(".qweight")], t["dims"][1] * BLOCK, t["dims"][0])]
            sizes += [t["raw"][1] - t["raw"][0] for t in kept if not _is_f32_matrix(t)]
            sizes += [_nbits_bytes((t["dims"][1], t["dims"][0] // BLOCK, BLOCK)) for t in kept
                      if t["name"] == "lm_head" and _is_f32_matrix(t) and t["dims"][0] % BLOCK == 0]  # its 8-bit copy
            self.arena = Arena(-(-sum(Arena.padded(n) for n in sizes) // HUGE_PAGE) * HUGE_PAGE)  # all streamed
            for t in sorted(table, key=lambda t: t["name"].endswith(".qweight")):  # blocks after their scales
                a, b = t["raw"]
                matrix = _is_f32_matrix(t)
                aside = matrix or t["name"].endswith(_TEMPORARY)
                out = (np.empty(b - a, np.uint8) if aside else self.arena.take(b - a)).view(_DTYPES[t["dtype"]])
                read_inline(fh, t, out)
                self.w[t["name"]] = out.reshape(t["dims"])
                if matrix:
                    self._pack(t["name"])
                if t["name"].endswith(".qweight"):
                    self._repack(t["name"][:-len(".qweight")])
        self.model = self._model(model)
        self.model.threads = resolve_threads(threads)
        self.model.kv_half = int(kv_cache == "f16")
        self._exact = (ctypes.c_int32 * len(exact_columns))(*exact_columns)
        self.model.head_q8_exact, self.model.head_q8_n_exact = ctypes.addressof(self._exact), len(exact_columns)
        self._known = {}  # the last call's caches: id -> _Buffers; replaced as one dict
        self._tables = None  # the last call's (_Buffers of each row, k table, v table); replaced as one tuple
        self._one = None  # the last one-position step's arguments (_OneStep)

    def _get(self, name):
        if name in self._external:
            raise FromageError(f"decoder.onnx keeps {name!r} as external data, which the native decoder does not read")
        if name not in self.w:
            raise FromageError(f"decoder.onnx has no weight {name!r} the native decoder needs "
                               f"(not a graph from export/llama_graph.py?)")
        return self.w[name]

    def _ptr(self, name) -> int:
        return self._get(name).ctypes.data

    def _pack(self, name: str) -> None:
        """An fp32 matrix (K, N), read aside -> panels of 16 columns in the arena (fm_linear.w), a part at a time."""
        w = self.w.pop(name)
        for i, part in enumerate(_parts(name, *w.shape)):
            piece = w if part is None else np.ascontiguousarray(np.take(w, part[1], axis=part[0]))
            key = name if part is None else f"{name}.{i}"
            out = self.arena.take(_panels_bytes(piece.shape)).view(np.float32)
            self.lib.fm_pack(piece.ctypes.data, piece.shape[0], piece.shape[1], out.ctypes.data)
            self._linears[key] = _Linear(F32, *piece.shape, 0, out.ctypes.data, None)
        if name == "lm_head" and w.shape[0] % BLOCK == 0:
            self._quantize_head(w)

    def _quantize_head(self, w: np.ndarray) -> None:
        """The fp32 head's 8-bit copy and bound (native/head_top.c): rows that want only their largest
        logits (greedy, top-k) read it, and compute exactly only the few that can be among them."""
        k, n = w.shape
        q, dm = np.empty((n, k // BLOCK, BLOCK), np.uint8), np.empty((n, 2 * (k // BLOCK)), np.uint16)
        self.head_bound = np.empty((2, n), np.float32)
        out = self.arena.take(_nbits_bytes(q.shape))
        if (self.lib.fm_quantize8(w.ctypes.data, k, n, q.ctypes.data, dm.ctypes.data, self.head_bound.ctypes.data)
                or self.lib.fm_pack_nbits(q.ctypes.data, dm.ctypes.data, k, n, 8, out.ctypes.data)):
            raise FromageError("the native decoder could not lay out the head's 8-bit copy")
        self._linears["lm_head.q8"] = _Linear(NBITS, k, n, 8, None, out.ctypes.data)
        self.head_top_bytes = (4 * k * n, out.nbytes)  # (the fp32 head's, its 8-bit copy's)

    def _repack(self, name: str) -> None:
        """A 4/8-bit matrix's blocks and scales (read aside) -> the kernels' layout in the arena."""
        q, d = self.w.pop(name + ".qweight"), self.w.pop(name + ".scales", None)
        if q.ndim != 3 or d is None:
            raise FromageError(f"decoder.onnx: {name} is not a MatMulNBits weight the native decoder reads")
        n, nb, nbytes = q.shape
        # MatMulNBits computes d * (q - 2^(bits-1)) [+ offsets (nb, N) * block sums, for Q4_1]:
        # the same as w = d * q + m per block, with (d, m) kept per column as fp16 [d... | m...]
        d = d.reshape(n, nb)
        m = -float(2 ** (nbytes * 8 // BLOCK - 1)) * d
        if name + ".offsets" in self.w:
            m = m + self.w.pop(name + ".offsets").T
        dm = np.concatenate([d, m], axis=1)
        if not np.array_equal(dm.astype(np.float16).astype(np.float32), dm):
            raise FromageError(f"{name}: block scales are not fp16 values (re-export the bundle)")
        dm, bits = dm.astype(np.float16), nbytes * 8 // BLOCK
        for i, part in enumerate(_parts(name, nb * BLOCK, n)):
            if part is None:
                q_part, dm_part = q, dm
            elif part[0] == 1:  # columns
                q_part, dm_part = q[part[1]], dm[part[1]]
            else:  # rows: whole blocks
                at = part[1][::BLOCK] // BLOCK
                q_part, dm_part = q[:, at], np.concatenate([dm[:, at], dm[:, nb + at]], axis=1)
            q_part, dm_part = np.ascontiguousarray(q_part), np.ascontiguousarray(dm_part)
            key = name if part is None else f"{name}.{i}"
            out = self.arena.take(_nbits_bytes(q_part.shape))
            if self.lib.fm_pack_nbits(q_part.ctypes.data, dm_part.ctypes.data, q_part.shape[1] * BLOCK, q_part.shape[0],
                                      bits, out.ctypes.data):
                raise FromageError(f"decoder.onnx: {name} has {nbytes * 8 / BLOCK:g}-bit blocks; the native decoder "
                                   f"reads 4- and 8-bit ones")
            self._linears[key] = _Linear(NBITS, q_part.shape[1] * BLOCK, q_part.shape[0], bits, None, out.ctypes.data)

    def _linear(self, name: str) -> _Linear:
        if name in self._linears:
            return self._linears[name]
        self._get(name)  # says what is missing
        raise FromageError(f"decoder.onnx: {name} is not a matrix the native decoder reads")

    def _model(self, model: dict) -> _Model:
        n_layers, kv, d = model["num_layers"], model["kv_heads"], model["head_dim"]
        layers = (_Layer * n_layers)()
        for i in range(n_layers):
            p = f"model.layers.{i}."
            layers[i] = _Layer(self._ptr(p + "input_layernorm.weight"), self._ptr(p + "post_attention_layernorm.weight"),
                               self._linear(p + "self_attn.qkv_proj"), self._linear(p + "self_attn.o_proj"),
                               self._mlp_linears(p + "mlp.gate_up_proj"), self._mlp_linears(p + "mlp.down_proj"))
        self._layers = layers  # kept alive: the model struct points into it
        qkv, gate_up = layers[0].qkv, layers[0].gate_up
        parts = sum(1 for part in gate_up if part.N)
        inter = sum(part.N for part in gate_up) // 2
        cos = self._get("cos_cache")
        extra = self._linears.get("lm_head.extra_rows", _Linear())
        head = self._linear("lm_head")
        self.vocab_size = head.N + extra.N
        wt = self._linear("W_t.weight")
        self.retrieval_dim = wt.N
        m = _Model(n_layers, qkv.K, qkv.N // d - 2 * kv, kv, d, inter, cos.shape[0], self.retrieval_dim, 0,
                   float(model["rms_norm_eps"]), cos.ctypes.data, self._ptr("sin_cache"), layers,
                   self._ptr("model.norm.weight"), head, extra, wt.w, self._ptr("W_t.bias"),
                   self._linears.get("lm_head.q8", _Linear()),
                   None if self.head_bound is None else self.head_bound.ctypes.data)
        m.mlp_parts = parts
        same = all((lay.qkv.K, lay.qkv.N, lay.o.K, lay.o.N) == (qkv.K, qkv.N, m.n_heads * d, qkv.K)
                   and all((lay.gate_up[s].K, lay.gate_up[s].N, lay.down[s].K, lay.down[s].N)
                           == (qkv.K, 2 * inter // parts, inter // parts, qkv.K) for s in range(parts))
                   for lay in layers)
        if m.n_heads < 1 or m.n_heads % kv or qkv.N % d or cos.shape[1] * 2 != d or not same:
            raise FromageError(f"decoder.onnx's shapes do not fit head_dim {d} / kv_heads {kv}")
        return m

    def _mlp_linears(self, name: str):
        """A layer's gate_up or down matrix as its MLP parts (fm_layer), the unused ones empty."""
        parts = [self._linears[f"{name}.{i}"] for i in range(MLP_PARTS) if f"{name}.{i}" in self._linears]
        if not parts:
            parts = [self._linear(name)]  # says what is missing
        return (_Linear * MLP_PARTS)(*parts)

    def forward(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray,
                top: int = 0) -> int:
        """Feed embeds (1, T, E) on `cache` ([key0, value0, key1, ...], each (1, kv, capacity, d),
        holding `past` positions); writes the last position's logits (V,) and ret (R,) in place.
        top: only the `top` largest logits are wanted (forward_batch's `top`; one position).
        -> for one position with top 1, the column of the largest logit but the exact columns' (forward_batch's
        `best`); else -1."""
        if top and embeds.ndim == 3 and embeds.shape[:2] == (1, 1) and logits.ndim == ret.ndim == 1:
            return self._step(embeds, cache, past, logits, ret, top)
        # checked on every call: the C code trusts these sizes
        if not (embeds.dtype == np.float32 and embeds.flags.c_contiguous and embeds.ndim == 3
                and embeds.shape[0] == 1 and embeds.shape[2] == self.model.hidden):
            raise FromageError(f"embeds must be C-contiguous float32 (1, T, {self.model.hidden})")
        if not all(a.dtype == np.float32 and a.flags.c_contiguous and a.shape == (n,)
                   for a, n in ((logits, self.vocab_size), (ret, self.retrieval_dim))):
            raise FromageError(f"logits and ret must be C-contiguous float32 ({self.vocab_size},) and "
                               f"({self.retrieval_dim},)")
        k, v = self._pointer_tables([cache])
        rc = self.lib.fm_forward(ctypes.byref(self.model), embeds.ctypes.data, embeds.shape[1], past,
                                 cache[0].shape[2], k, v, logits.ctypes.data, ret.ctypes.data)
        if rc:
            _raise_for(rc, f"{past} + {embeds.shape[1]} positions exceed the cache ({cache[0].shape[2]}) "
                           f"or the rotary table ({self.model.rope_positions})")
        return -1

    def _step(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray, top: int) -> int:
        """forward_batch of the one position embeds (1, 1, E) wanting its `top` largest logits: its checks and
        call with nothing else (the decode loop's step, in an interpreter the last step left cache-cold)."""
        if not (embeds.dtype == np.float32 and embeds.flags.c_contiguous and embeds.shape[2] == self.model.hidden
                and top > 0):
            raise FromageError(f"embeds must be C-contiguous float32 (1, 1, {self.model.hidden}), top > 0")
        step = self._one
        if step is None or step.logits is not logits or step.ret is not ret or not step.buffers.held_by(cache):
            step = self._one = _OneStep(self, cache, logits, ret, self._known)
        return step.run(embeds.__array_interface__["data"][0], past, top)

    def _check_outputs(self, logits: np.ndarray, ret: np.ndarray) -> None:
        if not (logits.dtype == ret.dtype == np.float32 and logits.flags.c_contiguous and ret.flags.c_contiguous
                and logits.flags.writeable and ret.flags.writeable
                and logits.shape == (self.vocab_size,) and ret.shape == (self.retrieval_dim,)):
            raise FromageError(f"logits and ret must be writable C-contiguous float32 ({self.vocab_size},) and "
                               f"({self.retrieval_dim},)")

    def token_steps(self, cache: list, logits: np.ndarray, ret: np.ndarray, table: np.ndarray) -> TokenSteps:
        """One-position steps on `cache` whose inputs are rows of the embedding table (V, E) (TokenSteps)."""
        return TokenSteps(self, cache, logits, ret, table)

    def op_times(self, run) -> tuple[int, dict]:
        """Calls run() with the library's per-operation clock on for this thread (fm_profile): -> (forward passes,
        {operation: seconds} over them). The layers' norms, matrices, rope and cache append (a step of one sequence
        does them in attention), attention and SiLU, then the head (final norm, logits and retrieval)."""
        seconds = (ctypes.c_double * len(OPS))()
        self.lib.fm_profile_read(seconds)  # from zero
        self.lib.fm_profile(1)
        try:
            run()
        finally:
            self.lib.fm_profile(0)
        return self.lib.fm_profile_read(seconds), dict(zip(OPS, seconds))

    def _pointer_tables(self, caches: list) -> tuple:
        """The k and v pointer tables of cache lists ([key0, value0, key1, ...] each), sequence-major
        (native/fromage_native.h). A cache's tables are remembered from the previous call while it holds the same
        buffers (one that grew has new ones), and the whole tables while every row's cache is the last call's: a
        step's caches are mostly the last step's, and Python ints into ctypes arrays are slow."""
        known, seen, rows = self._known, {}, []
        for cache in caches:
            buffers = seen.get(id(cache))  # rows of one prompt share its cache: looked at once per call
            if buffers is None:
                buffers = seen[id(cache)] = self._buffers(cache, known)
            rows.append(buffers)
        self._known = seen  # one assignment: other threads may call meanwhile (they rebuild what they miss)
        rows = tuple(rows)
        last = self._tables
        if last is not None and last[0] == rows:  # _Buffers compare by identity
            return last[1], last[2]  # a decoding batch's steps: the same caches as the last call's
        # joined from each cache's own tables (_Buffers) as bytes
        table = ctypes.c_void_p * sum(len(b.k) for b in rows)
        k = table.from_buffer_copy(b"".join(map(bytes, (b.k for b in rows))))
        v = table.from_buffer_copy(b"".join(map(bytes, (b.v for b in rows))))
        self._tables = (rows, k, v)
        return k, v

    def _buffers(self, cache: list, known: dict) -> _Buffers:
        """The cache's _Buffers from `known` (id -> _Buffers) while it holds them, else checked anew (the C code
        trusts their sizes)."""
        buffers = known.get(id(cache))
        return buffers if buffers is not None and buffers.held_by(cache) else _Buffers(cache, self._addresses(cache))

    def _addresses(self, cache: list) -> list[int]:
        n, kv, d, dtype = self.model.n_layers, self.model.n_kv, self.model.head_dim, self.kv_dtype
        shape = cache[0].shape if len(cache) == 2 * n else ()
        try:
            if not (len(shape) == 4 and shape[:2] == (1, kv) and shape[3] == d and shape[2] % KV_BLOCK == 0
                    and all(c.dtype == dtype and c.shape == shape for c in cache)):
                raise TypeError
            # from_buffer refuses buffers that are not C-contiguous and writable; ~4x cheaper than .ctypes.data
            return [ctypes.addressof(ctypes.c_char.from_buffer(c)) for c in cache] if shape[2] else \
                [c.ctypes.data for c in cache]
        except TypeError:
            raise FromageError(f"the KV cache must be {2 * n} C-contiguous writable {dtype} arrays "
                               f"of shape (1, {kv}, capacity, {d}), capacity a multiple of {KV_BLOCK}") from None

    def forward_batch(self, embeds: np.ndarray, caches: list, pasts: list, logits: np.ndarray, ret: np.ndarray,
                      out_rows: list | None = None, top: list | None = None, best: np.ndarray | None = None) -> None:
        """B rows in one call: row b feeds embeds[b] (embeds (B, E)) at position pasts[b] of cache caches[b]
        (as forward's). Writes the outputs of the rows out_rows (ascending; None: all B), in that order:
        logits (n, V) and ret (n, R), in place. Each weight matrix is read once for all B, and row b is
        bit-identical to forward() of that one position. Rows may share a cache at consecutive positions
        (one prompt's pieces), never a position. top (n counts, or None): how many of its largest logits
        each output row wants (0: all; 1: its greedy choice; k <= FM_MAX_TOP: top-k sampling's); with an fp32
        head, such a row's logits are exact where they can be among its k largest (ties included) and -inf
        elsewhere (native/head_top.c). best (n,) int32, if given: for each row with top 1, the column of its
        largest logit (the first of equal ones) among all but the exact columns (which the caller may rescale
        before it chooses; NaN never counts), -1 where none is above -inf; -1 for the other rows."""
        B, E = len(caches), self.model.hidden
        if not (B >= 1 and len(pasts) == B and embeds.dtype == np.float32 and embeds.flags.c_contiguous
                and embeds.shape == (B, E)):
            raise FromageError(f"embeds must be C-contiguous float32 (B, {E}), with B >= 1 caches and pasts")
        n = B if out_rows is None else len(out_rows)
        if out_rows is not None and not all(0 <= a < b for a, b in zip(out_rows, list(out_rows[1:]) + [B])):
            raise FromageError(f"out_rows must be ascending rows of the batch (0..{B - 1})")
        if not all(a.dtype == np.float32 and a.flags.c_contiguous and a.shape == (n, m)
                   for a, m in ((logits, self.vocab_size), (ret, self.retrieval_dim))):
            raise FromageError(f"logits and ret must be C-contiguous float32 ({n}, {self.vocab_size}) and "
                               f"({n}, {self.retrieval_dim})")
        # rows may share a cache (consecutive positions of one sequence: all rows append before any attends,
        # so each row sees the positions before it), never a position
        if len({(id(c[0]), p) for c, p in zip(caches, pasts)}) != B:
            raise FromageError("two rows of a batch would write the same position of one KV cache")
        k, v = self._pointer_tables(caches)
        capacity = [c[0].shape[2] for c in caches]
        rows = None if out_rows is None else (ctypes.c_int32 * n)(*out_rows)
        if top is not None and (len(top) != n or min(top, default=0) < 0):
            raise FromageError(f"top must have a count >= 0 per output row ({n}), got {top!r}")
        counts = (ctypes.c_int32 * n)(*top) if top is not None and any(top) else None
        if best is not None and not (best.dtype == np.int32 and best.flags.c_contiguous and best.shape == (n,)
                                     and best.flags.writeable):
            raise FromageError(f"best must be a writable C-contiguous int32 ({n},)")
        rc = self.lib.fm_forward_rows(ctypes.byref(self.model), embeds.ctypes.data, B, (ctypes.c_int32 * B)(*pasts),
                                      (ctypes.c_int32 * B)(*capacity), k, v, n, rows, counts, logits.ctypes.data,
                                      ret.ctypes.data, None if best is None else best.ctypes.data)
        if rc:
            b = next((b for b in range(B) if not 0 <= pasts[b] < min(capacity[b], self.model.rope_positions)), 0)
            _raise_for(rc, f"sequence {b}: {pasts[b]} + 1 positions exceed its cache ({capacity[b]}) "
                           f"or the rotary table ({self.model.rope_positions})")
