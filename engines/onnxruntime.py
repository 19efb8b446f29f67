"""ONNX Runtime engine. Execution providers are chosen by name: cpu, cuda, tensorrt."""
from __future__ import annotations

import numpy as np

from fromage.runtime.errors import FromageError

PROVIDERS = {
    "cpu": ["CPUExecutionProvider"],
    "cuda": ["CUDAExecutionProvider", "CPUExecutionProvider"],
    "tensorrt": ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"],
}


class OnnxRuntimeEngine:
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
        if threads:
            opts.intra_op_num_threads = threads
        if not spin:  # idle threads sleep at once instead of spinning on the cores the next step needs
            opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=wanted)
        except Exception as e:  # ORT raises its own exception types for bad graphs
            raise FromageError(f"ONNX Runtime cannot load {path}: {e}") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

        self.binding = self.session.io_binding()

    def run(self, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
        return self.session.run(outputs, feeds)

    # ---- I/O binding: inputs and outputs in caller-owned buffers, nothing allocated per call ----
    def bind_array(self, name: str, array: np.ndarray, output: bool) -> None:
        """Bind a C-contiguous float32 array; it must stay alive while bound."""
        assert array.dtype == np.float32 and array.flags.c_contiguous
        bind = self.binding.bind_output if output else self.binding.bind_input
        bind(name, "cpu", 0, np.float32, list(array.shape), array.ctypes.data)

    def run_bound(self) -> None:
        self.session.run_with_iobinding(self.binding)


class InPlaceDecoder:
    """The fused decoder graph (export/llama_graph.py) on ONNX Runtime, with the interface of
    native.NativeDecoder: past and present KV are the same buffers, bound once per cache, so the
    graph appends to the cache in place; logits and ret are written into the caller's arrays."""
    in_place = True

    def __init__(self, engine: OnnxRuntimeEngine):
        self.engine = engine
        self.kv_names, self.present_names = engine.input_names[3:], engine.output_names[2:]
        self._bound = None  # the cache whose buffers the I/O binding points at

    def forward(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray) -> None:
        total = past + embeds.shape[1]
        binding = self.engine.binding
        binding.bind_cpu_input("inputs_embeds", embeds)
        binding.bind_cpu_input("seqlens_k", np.array([total - 1], np.int32))
        binding.bind_cpu_input("total_sequence_length", np.array(total, np.int32))
        if self._bound is not cache[0]:  # another state, or this one's grown buffers
            for name, present, buf in zip(self.kv_names, self.present_names, cache):
                self.engine.bind_array(name, buf, output=False)
                self.engine.bind_array(present, buf, output=True)
            self.engine.bind_array("logits", logits[None], output=True)
            self.engine.bind_array("ret_embedding", ret[None], output=True)
            self._bound = cache[0]
        self.engine.run_bound()


class ConcatDecoder:
    """The generic exported decoder graph (export/graphs.py: other LMs), same interface: its past grows
    by one concatenation per call, so the cache list's arrays are replaced."""
    in_place = False

    def __init__(self, engine: OnnxRuntimeEngine):
        self.engine = engine
        self.kv_names = engine.input_names[3:]

    def forward(self, embeds: np.ndarray, cache: list, past: int, logits: np.ndarray, ret: np.ndarray) -> None:
        total = past + embeds.shape[1]
        feeds = {"inputs_embeds": embeds, "attention_mask": np.ones((1, total), dtype=np.int64),
                 "position_ids": np.arange(past, total, dtype=np.int64)[None], **dict(zip(self.kv_names, cache))}
        new_logits, new_ret, *cache[:] = self.engine.run(feeds)
        logits[:], ret[:] = new_logits[0], new_ret[0]


def create_engine(path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None,
                  spin: bool = True):
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(path, device=device, threads=threads, spin=spin)
    raise FromageError(f"unknown engine backend {backend!r} (available: onnxruntime)")
