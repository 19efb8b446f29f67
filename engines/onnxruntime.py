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
    def __init__(self, path, device: str = "cpu", threads: int | None = None):
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


def create_engine(path, backend: str = "onnxruntime", device: str = "cpu", threads: int | None = None):
    if backend == "onnxruntime":
        return OnnxRuntimeEngine(path, device=device, threads=threads)
    raise FromageError(f"unknown engine backend {backend!r} (available: onnxruntime)")
