"""ONNX Runtime engine. Execution providers are chosen by name: cpu, cuda, tensorrt."""
from __future__ import annotations

import threading

import numpy as np

from fromage.engines.base import resolve_threads
from fromage.engines.errors import FromageError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OrtSession:
    """One graph on ONNX Runtime (a base.Graph)."""

    def __init__(self, path, device: str = "cpu", threads: int | None = None, spin: bool = True):
        import onnxruntime as ort
        if device not in PROVIDERS:
            raise FromageError(f"unknown device {device!r} for ONNX Runtime (choose from {', '.join(PROVIDERS)})")
        wanted = PROVIDERS[device]
        if wanted[0] not in ort.get_available_providers():
            raise FromageError(f"ONNX Runtime here has no {wanted[0]} (available: "
                               f"{', '.join(ort.get_available_providers())}); install onnxruntime-gpu for cuda/tensorrt")
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.intra_op_num_threads = resolve_threads(threads)
        if not spin:  # idle threads sleep at once instead of spinning on the cores the next step needs
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise FromageError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)


def bind_array(binding, name: str, array: np.ndarray, output: bool) -> None:
    """Bind a C-contiguous float32 array to an I/O binding; it must stay alive while bound."""
    assert array.dtype == np.float32 and array.flags.c_contiguous
    bind = binding.bind_output if output else binding.bind_input
    bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)


def _first_positions(buffer: np.ndarray, n: int) -> np.ndarray:
    """A view of a cache buffer's first n positions: the ONNX graphs' caches are (1, kv, positions, d)."""
    return buffer[:, :, :n]


class InPlaceDecoder:
    """The fused decoder graph (export/llama_graph.py) on ONNX Runtime, with the interface of
    native.NativeDecoder: past and present KV are the same buffers, bound once per cache, so the
    graph appends to the cache in place; logits and ret are written into the caller's arrays.
    Several threads may call one decoder at once, each with its own cache."""
    in_place = True
    capacity_step = 1
    first_positions = staticmethod(_first_positions)

    def __init__(self, session: OrtSession):
        self.session = session
        self.kv_names, self.present_names = session.input_names[3:], session.output_names[2:]
        self._local = threading.local()  # an I/O binding per calling thread: one shared binding mixes calls

    def forward(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray,
                top: int = 0) -> int:
        """top: as NativeDecoder's; every logit is computed here, which meets any. -> -1: no best column (the
        caller reads the logits)."""
        total, ort, local = past + embeds.shape[1], self.session.session, self._local
        if not hasattr(local, "binding"):
            local.binding, local.bound = ort.io_binding(), (None, None, None)
        binding = local.binding
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        bound = (cache[0], logits, ret)  # held while bound, so `is` compares the very buffers
        if any(a is not b for a, b in zip(local.bound, bound)):
            for name, present, buf in zip(self.kv_names, self.present_names, cache):
                bind_array(binding, name, buf, output=False)
                bind_array(binding, present, buf, output=True)
            bind_array(binding, "logits", logits[None], output=True)
            bind_array(binding, "ret_embedding", ret[None], output=True)
            local.bound = bound
        ort.run_with_iobinding(binding)
        return -1


class ConcatDecoder:
    """The generic exported decoder graph (export/graphs.py: other LMs), same interface: its past grows
    by one concatenation per call, so the cache list's arrays are replaced."""
    in_place = False
    first_positions = staticmethod(_first_positions)

    def __init__(self, session: OrtSession):
        self.session = session
        self.kv_names = session.input_names[3:]

    def forward(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray,
                top: int = 0) -> int:
        """As InPlaceDecoder's."""
        total = past + embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), dtype=np.int64),
                 "position_ids": np.arange(past, total, dtype=np.int64)[None], **dict(zip(self.kv_names, cache))}
        new_logits, new_ret, *cache[:] = self.session.run(feeds)
        logits[:], ret[:] = new_logits[0], new_ret[0]
        return -1

