"""The worker side of `fromage bench`: one system (or the bandwidth probe) loaded in its own process,
answering one timed round per command on a line protocol (stdin/stdout JSON).

  python -m fromage.tools.bench_worker bandwidth THREADS | serve SPEC [SYSTEM]
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np


from fromage.runtime.errors import FromageError
from fromage.engines.onnx_weights import initializer_bytes


BASE_TEXT = ("Once upon a time, in a small village at the edge of a great forest, there lived a painter who "
             "collected pictures of animals, boats, houses and flowers. Every morning she walked to the market, "
             "listened to the stories of travellers and drew what they described: red kangaroos, blue whales, "
             "old lighthouses and bright yellow suns over green hills. ")


def peak_rss_mb() -> float:
    """Peak resident memory of this process (VmHWM; ru_maxrss where /proc is missing)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024 / (1024 if sys.platform == "darwin" else 1)


def prompt_ids(tokenizer, prefix: list[int], n: int) -> list[int]:
    """A fixed text, tokenized, repeated and truncated so that prefix + text is exactly n tokens."""
    want = n - len(prefix)
    if want < 1:
        raise FromageError(f"--prompt-tokens must be at least {len(prefix) + 1} "
                           f"(the tokenizer's prefix {prefix} + one text token)")
    base = tokenizer.encode(BASE_TEXT, add_special_tokens=False).ids
    ids = (base * (want // len(base) + 1))[:want]
    return list(prefix) + ids


def write_bench_image(path: Path, size: int = 320) -> Path:
    """A deterministic picture (gradients, a disc and noise), so every system reads the same bytes."""
    from PIL import Image
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    disc = ((x - 0.6) ** 2 + (y - 0.4) ** 2 < 0.06).astype(np.float32)
    noise = np.random.default_rng(0).random((size, size), dtype=np.float32)
    rgb = np.stack([x * 255, y * 200 + disc * 55, (1 - disc) * 120 + noise * 60], axis=-1)
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path)
    return path


# ---- the machine: memory bandwidth and arithmetic rate -----------------------------------------------
BANDWIDTH_GIB = 1.0  # far beyond any cache, about twice the default model's fp32 weights
BANDWIDTH_PASSES = 5  # per read method and measurement
FMA_PASS_S = 0.02  # one pass of the FMA loop
FMA_PASSES = 5  # its passes per measurement (their mean)
ROUND_TRIPS = 20_000  # cache-line round trips per measurement: ~1 ms on one L3, several ms across two
class MachineProbe:
    """Streaming reads over one array, run in a worker process whose BLAS has `threads` threads, and the
    native library's FMA loop on its `threads` OpenMP threads; `measure()` gives each read's mean rate over a
    few passes, the FMA loop's, and the two first threads' cache-line round trip (fm_core_round_trip). The
    bench asks for one before and after every run, so that each run is held against the machine as it was
    during the run. On shared machines all three move, and not together: the arithmetic rate says how much
    of the cores other tenants left (a decode step's norms, attention and 4-bit unpacking are work, not
    reads); the round trip whether the two cores share an L3 (~60 ns) or not (several times that: each of a
    step's waits of one thread for the other costs as much, while the two L3s' links may read faster).

    Mean, not best pass: a decode rate is a mean over a run, and on these shared machines the same
    read's fastest and median passes differ by up to 30 % within a minute, so the best pass would
    compare a quiet instant with a whole run."""

    def __init__(self, threads: int, gib: float = BANDWIDTH_GIB, passes: int = BANDWIDTH_PASSES,
                 arithmetic: bool = True):
        from concurrent.futures import ThreadPoolExecutor
        n = int(gib * (1 << 30)) // 4 // 4096 * 4096
        self.a = np.empty(n, dtype=np.float32)
        self.a.fill(1.0)  # touch every page first
        self.passes, self.pool = passes, ThreadPoolExecutor(threads)
        parts = np.array_split(self.a, threads)
        matrix, ones = self.a.reshape(-1, 4096), np.ones(4096, dtype=np.float32)

        def each(fn, chunks):
            return lambda: list(self.pool.map(fn, chunks))
        self.methods = {  # numpy releases the GIL in these loops, so Python threads read in parallel
            "numpy max per thread": each(np.max, parts),
            "numpy bitwise-or reduce per thread": each(np.bitwise_or.reduce, [p.view(np.uint32) for p in parts]),
            "BLAS gemv (matrix @ ones)": lambda: matrix @ ones,
        }
        try:  # native reads: one forward stream per thread (as the decoder's one-row kernels read), or several
            import ctypes
            from fromage.engines.native import load_library
            lib = load_library()
            lib.fm_stream_read.restype = ctypes.c_float
            lib.fm_stream_read.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_size_t]
            for streams, kib in ((1, 0), (8, 0), (4, 256)):
                name = f"native read, {streams} stream{'s' * (streams > 1)} per thread" + (
                    f" in {kib} KiB pieces dealt in turn" if kib else "")
                self.methods[name] = lambda k=streams, p=kib * 256: lib.fm_stream_read(
                    self.a.ctypes.data, self.a.size, k, p)
            self.fma = fma_probe(lib) if arithmetic else None
            self.round_trip = lambda: core_round_trip(lib)
        except FromageError:
            self.fma = self.round_trip = None  # no native library here: the numpy reads only
        self.info = {"array_bytes": int(self.a.nbytes), "methods": list(self.methods)}  # sent with 'ready'

    def measure(self) -> dict:
        mean, peak = {}, {}
        for name, fn in self.methods.items():
            times = []
            for _ in range(self.passes):
                t = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t)
            mean[name] = self.a.nbytes * len(times) / sum(times) / 1e9
            peak[name] = self.a.nbytes / min(times) / 1e9
        method = max(mean, key=mean.get)
        out = {"gb_s": mean[method], "method": method, "methods_gb_s": mean, "methods_peak_gb_s": peak}
        if self.fma:
            out["fma_gflop_s"] = self.fma()
        if self.round_trip:
            out["round_trip_ns"] = self.round_trip()
        return out


def core_round_trip(lib) -> float | None:
    """The first two OpenMP threads' cache-line round trip in ns (fm_core_round_trip); None with one thread."""
    return lib.fm_core_round_trip(ROUND_TRIPS) or None


def round_trip_text(ns: float | None) -> str:
    """A run's log line's note of the cores' round trip ('' without one)."""
    return f"; cores' round trip {ns:.0f} ns" if ns else ""


def fma_probe(lib, passes: int = FMA_PASSES, seconds: float = FMA_PASS_S):
    """-> a function that runs the native FMA loop (fm_fma_loop) `passes` times for about `seconds` each and
    returns its mean GFLOP/s."""
    import ctypes
    lib.fm_fma_loop.restype, lib.fm_fma_loop.argtypes = ctypes.c_double, [ctypes.c_int64]

    def run(iterations: int) -> tuple[float, float]:  # (flops, seconds)
        t = time.perf_counter()
        flops = lib.fm_fma_loop(iterations)
        return flops, time.perf_counter() - t
    run(100_000)  # the threads started
    iterations = max(10_000, int(100_000 * seconds / run(100_000)[1]))

    def rate() -> float:
        return sum(flops / t for flops, t in (run(iterations) for _ in range(passes))) / passes / 1e9
    return rate


# ---- worker side: one system in its own process ----------------------------------------------------
def _reply(out, obj) -> None:
    out.write(json.dumps(obj) + "\n")
    out.flush()


def serve(make_system, spec: dict, handle=None) -> int:
    """Line protocol on stdin/stdout: 'ready' after loading, then one reply per command: `handle(system,
    msg)`, by default one timed round (`run_round`). Everything else the process prints goes to stderr
    (the log), never into the protocol."""
    out = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    t0 = time.perf_counter()
    try:
        system = make_system(spec)
    except Exception as e:  # report any failure to load, with its cause
        traceback.print_exc()
        _reply(out, {"error": f"{type(e).__name__}: {e}"})
        return 1
    _reply(out, {"ready": True, "load_s": time.perf_counter() - t0, "peak_rss_mb": getattr(system, "peak_rss_mb", peak_rss_mb)(),
                 "info": getattr(system, "info", {})})
    for line in sys.stdin:
        msg = json.loads(line)
        if msg["cmd"] == "quit":
            break
        try:
            _reply(out, handle(system, msg) if handle else run_round(system, spec, msg["images"]))
        except Exception as e:
            traceback.print_exc()
            _reply(out, {"error": f"{type(e).__name__}: {e}"})
    return 0


def run_round(system, spec: dict, images: bool) -> dict:
    """One timed round of one system: the main generation, the TTFT of the other prompt variant
    (with/without image), the image-encode and retrieval latencies."""
    n = spec["new_tokens"]
    image_ok = getattr(system, "takes_images", False)
    main_image = images and image_ok
    r = system.generate(main_image, n)
    if len(r["tokens"]) != n:
        raise FromageError(f"decoded {len(r['tokens'])} tokens instead of {n}")
    times = r["token_times"]
    out = {"tokens": r["tokens"], "e2e_s": r["e2e_s"], "token_times": times}
    if n > 1:
        out["tpot_s"] = (times[-1] - times[0]) / (n - 1)
        out["decode_tok_s"] = (n - 1) / (times[-1] - times[0])
    if main_image:
        out["ttft_image_s"] = times[0]
        out["ttft_s"] = system.generate(False, 1)["token_times"][0]
    else:
        out["ttft_s"] = times[0]
        out["ttft_image_s"] = system.generate(True, 1)["token_times"][0] if image_ok else None
    if image_ok:
        out["image_encode_s"] = system.encode_image()
    if hasattr(system, "retrieval"):
        out["retrieval_s"] = system.retrieval()
    out["peak_rss_mb"] = getattr(system, "peak_rss_mb", peak_rss_mb)()  # a server peer: its server process's
    return out


class FromageSystem:
    """The fromage runtime, timed through its real decode loop (`Fromage.stream`)."""
    takes_images = True

    def __init__(self, spec: dict):
        from fromage.runtime.generate import Fromage
        from fromage.runtime.prompt import ImagePart
        from fromage.runtime.retrieval import ImageIndex
        from fromage.runtime.sampling import SamplingParams

        class Timed(Fromage):
            """Takes the prompt as exact token ids, and stamps the time after each decoder call:
            the first call is the prefill, call i+1 feeds token i, so the logits of token i
            are ready right after call i."""
            def segments(self, parts):
                return [p if isinstance(p, ImagePart) else list(p) for p in parts]

            def advance(self, state, embeds):
                super().advance(state, embeds)
                self.marks.append(time.perf_counter())

            def feed_token(self, state, token):
                n = len(self.marks)
                super().feed_token(state, token)
                if len(self.marks) == n:  # the native engine's token steps, not advance
                    self.marks.append(time.perf_counter())

        index = ImageIndex.open(spec["ret_index"], expected_dim=spec["retrieval_dim"])
        self.model = Timed(spec["bundle"], index=index, threads=spec["threads"], verify=False,
                           engine=spec.get("engine", "auto"), kv_cache=spec.get("kv_cache", "f32"))
        self.model.marks = []
        ids, at, self.image = spec["prompt_ids"], spec["image_at"], spec["image"]
        self.parts = {False: [ids], True: [p for p in (ids[:at], ImagePart(self.image), ids[at:]) if p != []]}
        self.params = lambda n: SamplingParams(max_new_tokens=n, temperature=0.0, stop_ids=[], retrieval=False)
        # the retrieval query: the decoder's [RET] embedding after the prompt and a [RET] token
        m = self.model
        state = m.start(m.embed_ids(ids + [m.ret_id])[None])
        self.query = state.ret_embedding.copy()
        self.info = {"weights_bytes": initializer_bytes(m.bundle.graph_path("decoder")),
                     "ret_index_size": index.count, "engine": m.engine}
        head = getattr(m.decoder, "head_top_bytes", None)
        if head:  # greedy tokens read the fp32 head's 8-bit copy, and a few of its panels (native/head_top.c)
            self.info["weights_bytes"] += head[1] - head[0]
            self.info["weights_note"] = "the head's 8-bit copy read instead of the fp32 head (greedy decoding)"
        if hasattr(m.decoder, "kernels"):  # the native engine: which copy of its kernels ran (avx512, avx2, portable)
            self.info["kernels"] = m.decoder.kernels

    def generate(self, image: bool, n: int) -> dict:
        from fromage.runtime.generate import Result
        m, result = self.model, Result()
        m.marks = []
        t0 = time.perf_counter()
        for _ in m.stream(self.parts[image], self.params(n), result):
            pass
        end = time.perf_counter()
        times = [t - t0 for t in m.marks[:n]]
        return {"tokens": result.token_ids, "token_times": times, "e2e_s": end - t0}

    def encode_image(self) -> float:
        t = time.perf_counter()
        self.model.encode_images([self.image])
        return time.perf_counter() - t

    def retrieval(self) -> float:
        t = time.perf_counter()
        self.model.index.search(self.query, top_k=1)
        return time.perf_counter() - t


def _module_main(argv: list[str]) -> int:
    """Subprocess entry points: `bandwidth THREADS` (the machine probe) and `serve SPEC` (the fromage worker)."""
    if argv[:1] == ["bandwidth"]:
        return serve(lambda spec: MachineProbe(spec["threads"]), {"threads": int(argv[1])},
                     lambda probe, msg: probe.measure())
    if argv[:1] == ["serve"]:
        spec = json.loads(Path(argv[1]).read_text())
        if len(argv) > 2 and argv[2] != "fromage":  # an --also bundle or engine
            spec.update(spec["also"][argv[2]])
        return serve(FromageSystem, spec)
    print("usage: python -m fromage.tools.bench_worker (bandwidth THREADS | serve SPEC [SYSTEM])", file=sys.stderr)
    return 2



if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
