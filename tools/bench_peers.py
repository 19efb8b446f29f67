"""The systems `fromage bench --compare` measures fromage against, on the same LM, prompt and settings.

  hf              Hugging Face `generate`: eager attention, KV cache on, greedy
  reference       the FROMAGe reference decode loop: the whole sequence re-run every step (no cache)
  optimum         optimum's ORTModelForCausalLM on an ONNX export of the LM made once by optimum
  ort_genai       ONNX Runtime GenAI on a model made once by its own builder, fp32
  ort_genai_int4  the same builder with -p int4
  llama_cpp       llama.cpp's llama-server on the default LM's Q4_1 GGUF (compare with 4-bit bundles), timed
                  by its own timings (no Python in its loop); built once from llama-cpp-python's vendored tree
  llama_cpp_f32   the same on an F32 GGUF of those weights (compare with fp32 bundles)

Each runs in its own process (torch and transformers are imported by the systems that need them):

  python -m fromage.tools.bench_peers hf --bundle B [--runs 3 --warmup 1 ...]   # one-shot, prints JSON
  python -m fromage.tools.bench_peers optimum --spec spec.json --prepare          # export once (cached)
  python -m fromage.tools.bench_peers hf --spec spec.json --serve                 # worker for `fromage bench`

Prepared models are cached under cache_root()/peers/. ORT GenAI's builder needs transformers 5.x,
which our training stack does not use (4.57): it runs in a venv of its own created there once.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fromage.runtime.errors import FromageError

GENAI_BUILDER_PACKAGES = ["onnxruntime-genai==0.18.0", "transformers>=5,<6", "torch==2.13.0", "onnx", "onnx-ir"]


# ---- where things are -------------------------------------------------------------------------
def peers_dir(spec: dict) -> Path:
    from fromage.training.backbones import cache_root
    return Path(spec["cache"]) / "peers" if spec.get("cache") else cache_root() / "peers"


def lm_dir(spec: dict) -> Path:
    from fromage.training.backbones import resolve_lm_path
    return resolve_lm_path(spec["lm"]).resolve()


def lm_key(path: Path) -> str:
    """A name for a prepared copy of an LM folder: its name + a hash of its config and weight files."""
    h = hashlib.sha256(str(path).encode())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return f"{path.name}-{h.hexdigest()[:12]}"


def _atomic_dir(out: Path, build) -> Path:
    """Build into a temp folder next to `out`, rename into place when done (a killed build leaves no cache)."""
    if out.is_dir():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    try:
        build(tmp)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _run(cmd: list[str], what: str, env: dict | None = None) -> None:
    print(f"[bench_peers] {what}: {' '.join(map(str, cmd))}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, stdout=sys.stderr, stderr=sys.stderr, env=env)
    if proc.returncode != 0:
        raise FromageError(f"{what} failed (exit code {proc.returncode}); see the log above")


# ---- preparation (cached) -----------------------------------------------------------------------
def prepare_optimum(spec: dict) -> Path:
    src = lm_dir(spec)
    out = peers_dir(spec) / f"optimum-{lm_key(src)}"

    def build(tmp: Path):
        from optimum.exporters.onnx import main_export
        print(f"[bench_peers] exporting {src} to ONNX with optimum (once) ...", file=sys.stderr, flush=True)
        main_export(str(src), output=tmp, task="text-generation-with-past", device="cpu", do_validation=False)
    return _atomic_dir(out, build)


def genai_builder_python(spec: dict) -> Path:
    """A venv used only to run ORT GenAI's model builder (it needs transformers 5.x)."""
    venv = peers_dir(spec) / "genai-builder-venv"
    python = venv / "bin" / "python"
    if (venv / ".ready").is_file():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    _run([sys.executable, "-m", "venv", str(venv)], "creating the ORT GenAI builder venv")
    _run([str(python), "-m", "pip", "install", "-q", *GENAI_BUILDER_PACKAGES], "installing the ORT GenAI builder")
    (venv / ".ready").write_text(json.dumps(GENAI_BUILDER_PACKAGES))
    return python


def prepare_genai(spec: dict, precision: str) -> Path:
    src = lm_dir(spec)
    out = peers_dir(spec) / f"ort_genai-{precision}-{lm_key(src)}"
    if out.is_dir():
        return out
    python = genai_builder_python(spec)

    def build(tmp: Path):
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
        with tempfile.TemporaryDirectory() as hf_cache:
            _run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(tmp),
                  "-p", precision, "-e", "cpu", "-c", hf_cache], f"building the ORT GenAI {precision} model", env)
        if not (tmp / "genai_config.json").is_file():
            raise FromageError(f"ORT GenAI's builder wrote no genai_config.json into {tmp}")
    return _atomic_dir(out, build)


PREPARE = {"optimum": prepare_optimum, "ort_genai": lambda s: prepare_genai(s, "fp32"),
           "ort_genai_int4": lambda s: prepare_genai(s, "int4")}


# ---- the systems (same interface as fromage.tools.bench_worker.FromageSystem) --------------------------
class _Timer:
    """A `generate` streamer: stamps the time each new token arrives (the first put is the prompt)."""

    def __init__(self):
        self.t0, self.times, self.tokens, self.prompt_seen = time.perf_counter(), [], [], False

    def put(self, value):
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        now = time.perf_counter()
        for t in value.reshape(-1).tolist():
            self.tokens.append(int(t))
            self.times.append(now - self.t0)

    def end(self):
        pass


def _weights_bytes(model) -> int:
    seen, total = set(), 0
    for p in model.parameters():
        if p.data_ptr() not in seen:  # tied tables once
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


class _GenerateSystem:
    """Anything with Hugging Face's `generate` (transformers, optimum)."""
    takes_images = False

    def _setup(self, spec: dict, model):
        import torch
        from transformers import GenerationConfig
        self.model, self.torch = model, torch
        self.ids = torch.tensor([spec["prompt_ids"]], dtype=torch.long)
        model.generation_config.eos_token_id = None  # no stop token: exactly n tokens
        self.config = lambda n: GenerationConfig(do_sample=False, num_beams=1, max_new_tokens=n, min_new_tokens=0,
                                                 eos_token_id=None, pad_token_id=0, use_cache=True)

    def generate(self, image: bool, n: int) -> dict:
        timer = _Timer()
        with self.torch.inference_mode():
            self.model.generate(self.ids, attention_mask=self.torch.ones_like(self.ids),
                                generation_config=self.config(n), streamer=timer)
        e2e = time.perf_counter() - timer.t0
        return {"tokens": timer.tokens, "token_times": timer.times, "e2e_s": e2e}


class HFSystem(_GenerateSystem):
    def __init__(self, spec: dict):
        import torch
        from transformers import AutoModelForCausalLM
        torch.set_num_threads(spec["threads"])
        model = AutoModelForCausalLM.from_pretrained(lm_dir(spec), dtype=torch.float32,
                                                     attn_implementation="eager").eval()
        self._setup(spec, model)
        self.info = {"weights_bytes": _weights_bytes(model), "attention": "eager"}


class OptimumSystem(_GenerateSystem):
    def __init__(self, spec: dict):
        import onnxruntime as ort
        import torch
        from optimum.onnxruntime import ORTModelForCausalLM
        torch.set_num_threads(spec["threads"])
        path = prepare_optimum(spec)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = spec["threads"]
        model = ORTModelForCausalLM.from_pretrained(path, session_options=opts, use_cache=True,
                                                    provider="CPUExecutionProvider")
        self._setup(spec, model)
        from fromage.engines.onnx_weights import initializer_bytes
        self.info = {"weights_bytes": sum(initializer_bytes(f) for f in path.glob("*.onnx")), "model_dir": str(path)}


class ReferenceSystem:
    """The FROMAGe reference decoding (training/reference.py): each step re-runs the whole sequence
    through `FromageModel.forward_lm` (use_cache=False), greedy, [RET] banned."""
    takes_images = True

    def __init__(self, spec: dict):
        import torch
        from fromage.training.model import FromageConfig, FromageModel
        torch.set_num_threads(spec["threads"])
        self.torch = torch
        # the bundle's architecture (LM, encoder, k); the learned pieces are freshly initialised,
        # which changes no timing (and no text without images: [RET] is banned)
        self.model = FromageModel(FromageConfig.from_dict(spec["model"])).eval()
        self.ids, self.at, self.image = spec["prompt_ids"], spec["image_at"], spec["image"]
        self.info = {"weights_bytes": _weights_bytes(self.model.lm)}

    def _visual(self):
        from fromage.runtime.preprocess import preprocess
        pixels = self.torch.from_numpy(preprocess([self.image], self.model.encoder.preprocessing))
        return self.model.visual_tokens(self.model.encode_images(pixels))[0]

    def encode_image(self) -> float:
        t = time.perf_counter()
        with self.torch.no_grad():
            self._visual()
        return time.perf_counter() - t

    def generate(self, image: bool, n: int) -> dict:
        from fromage.runtime.sampling import SamplingParams
        from fromage.training.reference import reference_decode
        torch, m = self.torch, self.model
        params = SamplingParams(max_new_tokens=n, temperature=0.0, stop_ids=[], retrieval=False)
        t0 = time.perf_counter()
        times = []
        with torch.no_grad():
            ids = torch.tensor(self.ids)
            chunks = [m.embed_tokens(ids[:self.at]), self._visual(), m.embed_tokens(ids[self.at:])] if image \
                else [m.embed_tokens(ids)]
            out = reference_decode(m, torch.cat(chunks).unsqueeze(0), params,
                                   on_token=lambda _: times.append(time.perf_counter() - t0))
        return {"tokens": out["token_ids"], "token_times": times, "e2e_s": time.perf_counter() - t0}


class GenAISystem:
    takes_images = False

    def __init__(self, spec: dict, precision: str):
        import onnxruntime_genai as og
        from fromage.engines.onnx_weights import initializer_bytes
        self.og, self.ids = og, spec["prompt_ids"]
        path = prepare_genai(spec, precision)
        config = og.Config(str(path))
        # no stop token (exactly n tokens), and the benchmark's thread count
        config.overlay(json.dumps({"model": {"eos_token_id": [], "decoder": {
            "session_options": {"intra_op_num_threads": spec["threads"]}}}}))
        self.model = og.Model(config)
        self.info = {"weights_bytes": sum(initializer_bytes(f) for f in path.glob("*.onnx")),
                     "model_dir": str(path), "precision": precision}

    def generate(self, image: bool, n: int) -> dict:
        og = self.og
        params = og.GeneratorParams(self.model)
        params.set_search_options(do_sample=False, max_length=len(self.ids) + n)
        t0 = time.perf_counter()
        gen = og.Generator(self.model, params)
        gen.append_tokens(self.ids)
        times, tokens = [], []
        for _ in range(n):
            gen.generate_next_token()
            tokens.append(int(gen.get_next_tokens()[0]))
            times.append(time.perf_counter() - t0)
        return {"tokens": tokens, "token_times": times, "e2e_s": time.perf_counter() - t0}


class LlamaCppSystem:
    """llama.cpp's llama-server (built once from the tree vendored in llama-cpp-python: tools/llama_cpp.py)
    on the default LM's GGUF: Q4_1 as shipped (llama_cpp), or its F32 dequantization (llama_cpp_f32).
    Timed by llama.cpp itself, without Python in its loop: each run is one /completion request of the
    prompt's token ids (no prompt cache, greedy, no stop), and the times are the server's own timings:
    TTFT = prompt_ms (prefill and the first token), decode = predicted_ms / predicted_n per token (as
    llama.cpp reports its t/s). Peak memory: the server process's VmHWM."""
    takes_images = False

    def __init__(self, spec: dict, precision: str):
        import urllib.request
        from fromage.tools.llama_cpp import ensure_built, f32_gguf
        from fromage.tools.server_process import Server, free_port
        from fromage.training.backbones import default_gguf_path
        cache = _llama_cpp_cache(spec)
        gguf = f32_gguf(cache) if precision == "f32" else default_gguf_path()
        binary = ensure_built(cache) / "llama-server"
        threads, ctx, port = spec["threads"], -(-(len(spec["prompt_ids"]) + spec["new_tokens"] + 64) // 256) * 256, free_port()
        self.server = Server("llama-server", [binary, "-m", gguf, "--host", "127.0.0.1", "--port", port, "-t", threads,
                                              "-tb", threads, "-np", 1, "-c", ctx, "--no-webui"], port)
        self.url, self.ids, self.request = self.server.url, spec["prompt_ids"], urllib.request
        self.info = {"weights_bytes": gguf.stat().st_size, "gguf": str(gguf), "precision": precision,
                     "server": str(binary), "timing": "llama-server's own timings (prompt_ms, predicted_ms)"}

    def generate(self, image: bool, n: int) -> dict:
        body = {"prompt": self.ids, "n_predict": n, "ignore_eos": True, "temperature": 0.0, "top_k": 1,
                "cache_prompt": False, "return_tokens": True, "stream": False}
        req = self.request.Request(self.url + "/completion", data=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
        with self.request.urlopen(req, timeout=600) as r:
            out = json.loads(r.read())
        t = out["timings"]
        if t.get("predicted_n") != n:
            raise FromageError(f"llama-server decoded {t.get('predicted_n')} tokens instead of {n}")
        first, step = t["prompt_ms"] / 1000, t["predicted_ms"] / 1000 / max(t["predicted_n"], 1)
        tokens = [int(x) for x in out.get("tokens") or []] or [0] * n  # no ids from this server: placeholders
        return {"tokens": tokens[:n], "token_times": [first + i * step for i in range(n)],
                "e2e_s": (t["prompt_ms"] + t["predicted_ms"]) / 1000}

    def peak_rss_mb(self) -> float:
        """The server's peak resident memory (VmHWM)."""
        return self.server.memory_mb("VmHWM") or 0.0

    def __del__(self):
        if getattr(self, "server", None) is not None:
            self.server.close()


def _llama_cpp_cache(spec: dict) -> Path:
    """The cache folder of the llama.cpp peers, which run the default LM's own GGUF only."""
    from fromage.training.backbones import DEFAULT_LM, cache_root
    if spec["lm"] != DEFAULT_LM:
        raise FromageError(f"the llama.cpp peers run the default LM's GGUF; this bundle's LM is {spec['lm']!r}")
    return Path(spec["cache"]) if spec.get("cache") else cache_root()


def _prepare_llama_cpp(spec: dict, precision: str) -> Path:
    """Builds llama-server once (and, for F32, dequantizes the GGUF once)."""
    from fromage.tools.llama_cpp import ensure_built, f32_gguf
    cache = _llama_cpp_cache(spec)
    binaries = ensure_built(cache)
    return f32_gguf(cache) if precision == "f32" else binaries


PREPARE["llama_cpp"] = lambda s: _prepare_llama_cpp(s, "q4_1")
PREPARE["llama_cpp_f32"] = lambda s: _prepare_llama_cpp(s, "f32")

SYSTEMS = {"hf": HFSystem, "reference": ReferenceSystem, "optimum": OptimumSystem,
           "ort_genai": lambda s: GenAISystem(s, "fp32"), "ort_genai_int4": lambda s: GenAISystem(s, "int4"),
           "llama_cpp": lambda s: LlamaCppSystem(s, "q4_1"), "llama_cpp_f32": lambda s: LlamaCppSystem(s, "f32")}


# ---- command line ----------------------------------------------------------------------------------
def spec_from_bundle(args) -> dict:
    """The same spec `fromage bench` writes, for running one peer by hand."""
    from tokenizers import Tokenizer
    from fromage.engines.base import default_threads
    from fromage.tools.bench_worker import prompt_ids, write_bench_image
    from fromage.runtime.bundle_reader import load_bundle
    bundle = load_bundle(args.bundle, verify=False)
    tok = Tokenizer.from_file(str(bundle.directory / "tokenizer.json"))
    image = Path(tempfile.mkdtemp(prefix="fromage-bench-")) / "bench.png"
    return {"bundle": str(bundle.directory), "lm": bundle.model["lm"], "model": bundle.model,
            "prompt_ids": prompt_ids(tok, bundle.tokens["prefix"], args.prompt_tokens),
            "image_at": len(bundle.tokens["prefix"]), "image": str(write_bench_image(image)),
            "new_tokens": args.new_tokens, "threads": args.threads or default_threads(),
            "cache": args.cache}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m fromage.tools.bench_peers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("peer", choices=sorted(SYSTEMS))
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--spec", help="the spec file written by `fromage bench`")
    src.add_argument("--bundle", help="a fromage bundle: its LM, tokenizer and prompt")
    ap.add_argument("--prepare", action="store_true", help="only prepare (export/build) the peer's model")
    ap.add_argument("--serve", action="store_true", help="worker mode for `fromage bench` (JSON lines)")
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--images", type=int, choices=(0, 1), default=0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int)
    ap.add_argument("--cache", help="cache folder (default: fromage's cache)")
    args = ap.parse_args(argv)
    spec = json.loads(Path(args.spec).read_text()) if args.spec else spec_from_bundle(args)
    from fromage.tools.bench_report import summarize
    from fromage.tools.bench_worker import run_round, serve
    try:
        if args.prepare:
            if args.peer in PREPARE:
                print(json.dumps({"prepared": str(PREPARE[args.peer](spec))}))
            else:
                print(json.dumps({"prepared": None}))
            return 0
        if args.serve:
            return serve(SYSTEMS[args.peer], spec)
        t0 = time.perf_counter()
        system = SYSTEMS[args.peer](spec)
        ready = {"load_s": time.perf_counter() - t0, "info": getattr(system, "info", {})}
        rounds = [run_round(system, spec, bool(args.images)) for _ in range(args.warmup + args.runs)]
        print(json.dumps(summarize(rounds[args.warmup:], ready)))
    except FromageError as e:
        print(f"bench_peers: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
