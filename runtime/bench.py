"""`fromage bench`: the numbers users measure first (cf. trtexec, llama-bench, optimum-benchmark).

Batch-1 greedy decoding with [RET] banned and no stop tokens, so every run decodes exactly
--new-tokens tokens after a prompt of exactly --prompt-tokens tokens. Each system (fromage and,
with --compare, the peers of `fromage.training.bench_peers`) runs in its own worker subprocess,
loaded once; the timed runs are interleaved round by round (A B C A B C ...) so that the noise
of a shared machine hits every system alike. The memory-bandwidth roofline is measured the same way:
a probe subprocess reads a 1 GiB array once per round (numpy's reads and the native multi-stream
read). `--retrieval N` benchmarks the image index on N random clustered vectors.

This module never imports torch or transformers: the peers that need them live in training/.
"""
from __future__ import annotations

import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import numpy as np

from fromage.engines.base import default_threads

from .bench_retrieval import build_vector_index, clustered_vectors, run_retrieval_bench
from .errors import FromageError
from .onnx_weights import initializer_bytes

PEERS = ("hf", "reference", "optimum", "ort_genai", "ort_genai_int4")
PREPARED_PEERS = {"optimum", "ort_genai", "ort_genai_int4"}  # an ONNX export / model build first, cached
BASE_TEXT = ("Once upon a time, in a small village at the edge of a great forest, there lived a painter who "
             "collected pictures of animals, boats, houses and flowers. Every morning she walked to the market, "
             "listened to the stories of travellers and drew what they described: red kangaroos, blue whales, "
             "old lighthouses and bright yellow suns over green hills. ")
RET_INDEX_SIZE = 10_000  # vectors in the index the fromage [RET] query is timed against
WORKER_TIMEOUT_S = 3600


# ---- small helpers -----------------------------------------------------------------------------
def cache_root() -> Path:
    from fromage.training.backbones import cache_root as root  # torch-free module
    return root()


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


def percentiles(values) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    a = np.asarray(vals)
    return {"median": float(np.median(a)), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max()), "runs": vals}


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


# ---- memory bandwidth ----------------------------------------------------------------------------
BANDWIDTH_GIB = 1.0  # far beyond any cache, about twice the default model's fp32 weights
BANDWIDTH_PASSES = 5  # per read method and round
# a pause before each system's round and the probe: the previous process's idle thread pools (ONNX
# Runtime, OpenBLAS) spin for a while after their work, and took the cores from the next system's prefill
SETTLE_S = 0.25


class BandwidthProbe:
    """Streaming reads over one array, run in a worker process whose BLAS has `threads` threads;
    `measure()` gives each method's mean rate over a few passes. The bench asks for one measurement
    per round, between the systems' runs, so the roofline sees the machine as the runs saw it.

    Mean, not best pass: a decode rate is a mean over a run, and on these shared machines the same
    read's fastest and median passes differ by up to 30 % within a minute, so the best pass would
    compare a quiet instant with a whole run."""

    def __init__(self, threads: int, gib: float = BANDWIDTH_GIB, passes: int = BANDWIDTH_PASSES):
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
        try:  # the read the decoder's kernels do: several forward streams per thread
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
        except FromageError:
            pass  # no native library here: the numpy reads only
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
        return {"gb_s": mean[method], "method": method, "methods_gb_s": mean, "methods_peak_gb_s": peak}


def bandwidth_summary(samples: list[dict], threads: int, array_bytes: int) -> dict:
    """The roofline's bandwidth: the median over the rounds of each round's fastest read."""
    best = [s["gb_s"] for s in samples]
    winners = [s["method"] for s in samples]

    def median_of(key):
        return {name: float(np.median([s[key][name] for s in samples])) for name in samples[0][key]}
    return {"gb_s": float(np.median(best)), "per_round_gb_s": best, "max_gb_s": max(best),
            "method": max(set(winners), key=winners.count), "methods_gb_s": median_of("methods_gb_s"),
            "methods_peak_gb_s": median_of("methods_peak_gb_s"), "threads": threads, "array_bytes": array_bytes,
            "how": (f"each round, between the systems' runs, {BANDWIDTH_PASSES} passes of each read over one "
                    f"{array_bytes / 2**30:.2f} GiB float32 array with {threads} thread(s); a round's bandwidth "
                    "is the fastest read's mean rate over its passes (methods_peak_gb_s: their single fastest "
                    "passes), the roofline's is the median over the timed rounds (per_round_gb_s), like the "
                    "systems' decode rates, which are means over a run")}


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
    _reply(out, {"ready": True, "load_s": time.perf_counter() - t0, "peak_rss_mb": peak_rss_mb(),
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
    out["peak_rss_mb"] = peak_rss_mb()
    return out


class FromageSystem:
    """The fromage runtime, timed through its real decode loop (`Fromage.stream`)."""
    takes_images = True

    def __init__(self, spec: dict):
        from .generate import Fromage
        from .prompt import ImagePart
        from .retrieval import ImageIndex
        from .sampling import SamplingParams

        class Timed(Fromage):
            """Takes the prompt as exact token ids, and stamps the time after each decoder call:
            the first call is the prefill, call i+1 feeds token i, so the logits of token i
            are ready right after call i."""
            def segments(self, parts):
                return [p if isinstance(p, ImagePart) else list(p) for p in parts]

            def advance(self, state, embeds):
                super().advance(state, embeds)
                self.marks.append(time.perf_counter())

        index = ImageIndex.open(spec["ret_index"], expected_dim=spec["retrieval_dim"])
        self.model = Timed(spec["bundle"], index=index, threads=spec["threads"], verify=False,
                           engine=spec.get("engine", "auto"))
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

    def generate(self, image: bool, n: int) -> dict:
        from .generate import Result
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


# ---- orchestrator side -----------------------------------------------------------------------------
class WorkerError(Exception):
    pass


class Worker:
    def __init__(self, name: str, argv: list[str], env: dict, log_path: Path):
        self.name, self.log_path = name, log_path
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log,
                                     text=True, env=env)

    def request(self, msg: dict | None, timeout: float = WORKER_TIMEOUT_S) -> dict:
        if msg is not None:
            try:
                self.proc.stdin.write(json.dumps(msg) + "\n")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError):
                pass  # the process died: readline says so below
        timer = threading.Timer(timeout, self.proc.kill)
        timer.start()
        try:
            line = self.proc.stdout.readline()
        finally:
            timer.cancel()
        if not line:
            rc = self.proc.wait()
            raise WorkerError(f"worker exited (code {rc}){' after the time limit' if rc == -9 else ''}: "
                              f"{self.log_tail()}")
        reply = json.loads(line)
        if "error" in reply:
            raise WorkerError(f"{reply['error']} (log: {self.log_path})")
        return reply

    def log_tail(self, lines: int = 6) -> str:
        self.log.flush()
        try:
            text = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=60)
            except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def worker_env(threads: int) -> dict:
    t = str(threads)
    return dict(os.environ, OMP_NUM_THREADS=t, MKL_NUM_THREADS=t, OPENBLAS_NUM_THREADS=t,
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                PYTHONUNBUFFERED="1", TRANSFORMERS_VERBOSITY="error")


def worker_argv(system: str, spec_path: Path) -> list[str]:
    if system.startswith("fromage"):  # fromage, or fromage_<precision|engine> for --also / --also-engine
        return [sys.executable, "-m", "fromage.runtime.bench", "serve", str(spec_path), system]
    return [sys.executable, "-m", "fromage.training.bench_peers", system, "--spec", str(spec_path), "--serve"]


def prepare_peer(system: str, spec_path: Path, env: dict, log_path: Path) -> None:
    """One-time preparation (ONNX export, ORT GenAI model build), cached under cache_root()/peers."""
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "fromage.training.bench_peers", system, "--spec",
                               str(spec_path), "--prepare"], stdout=log, stderr=subprocess.STDOUT, env=env,
                              timeout=3600)
    if proc.returncode != 0:
        tail = " | ".join(log_path.read_text(errors="replace").strip().splitlines()[-6:])
        raise WorkerError(f"preparing {system} failed (code {proc.returncode}): {tail} (log: {log_path})")


def ensure_ret_index(dim: int, count: int, cache: Path, progress: bool = True) -> Path:
    """An index of `count` random unit vectors, built once with the runtime's own index builder."""
    out = cache / "bench" / f"ret-index-v2-d{dim}-n{count}"  # v2: items named as build_vector_index names them
    build_vector_index(clustered_vectors(count, dim, seed=1)[0], out, f"bench-random-v1-d{dim}", progress).close()
    return out


def summarize(rounds: list[dict], ready: dict, fromage_tokens: list[int] | None = None) -> dict:
    """Per-metric statistics over the timed rounds of one system."""
    def ms(key):
        return [None if r.get(key) is None else r[key] * 1000 for r in rounds]
    series = {"decode_tok_s": [r.get("decode_tok_s") for r in rounds], "tpot_ms": ms("tpot_s"),
              "ttft_ms": ms("ttft_s"), "ttft_image_ms": ms("ttft_image_s"), "e2e_ms": ms("e2e_s"),
              "image_encode_ms": ms("image_encode_s"), "retrieval_ms": ms("retrieval_s")}
    stats = {k: percentiles(v) for k, v in series.items()}
    out = {k: (s["median"] if s else None) for k, s in stats.items()}
    itl = [1000 * (b - a) for r in rounds for a, b in zip(r["token_times"], r["token_times"][1:])]
    stats["inter_token_ms"] = percentiles(itl)
    if stats["inter_token_ms"]:
        stats["inter_token_ms"].pop("runs")  # per token, not per run: too long to keep
    out["percentiles"] = stats
    out["peak_rss_mb"] = max([ready.get("peak_rss_mb", 0)] + [r["peak_rss_mb"] for r in rounds])
    out["load_s"] = ready.get("load_s")
    out["tokens"] = rounds[-1]["tokens"]
    if fromage_tokens is not None:
        same = 0
        for a, b in zip(out["tokens"], fromage_tokens):
            if a != b:
                break
            same += 1
        out["agrees_with_fromage_tokens"] = same
    out.update(ready.get("info", {}))
    return out


def run_bench(args, log=print) -> dict:
    from tokenizers import Tokenizer
    from .bundle import load_bundle
    threads = args.threads or default_threads()
    peers = resolve_peers(args.compare)
    bundle = load_bundle(args.bundle, verify=True)
    m = bundle.model
    tokenizer = Tokenizer.from_file(str(bundle.directory / "tokenizer.json"))
    ids = prompt_ids(tokenizer, bundle.tokens["prefix"], args.prompt_tokens)
    if args.prompt_tokens + args.new_tokens + m["k"] > m["max_positions"]:
        raise FromageError(f"prompt + new tokens ({args.prompt_tokens} + {args.new_tokens} + an image) exceed the "
                           f"model's context of {m['max_positions']} positions")
    also = {}
    for path in args.also or []:  # more bundles of the same model, e.g. --quantize int4
        other = load_bundle(path, verify=True)
        if other.model["lm"] != m["lm"] or other.model["vocab_size"] != m["vocab_size"]:
            raise FromageError(f"--also {path}: not a bundle of the same model as {args.bundle}")
        precision = other.manifest.get("precision", "fp32")
        name = f"fromage_{precision}" + ("_fp32act" if precision != "fp32" and other.manifest.get("activations")
                                        == "fp32" else "")
        if name == "fromage_fp32" or name in also:
            raise FromageError(f"--also {path}: a second {name[8:]} bundle; give bundles of other precisions")
        also[name] = {"bundle": str(other.directory.resolve()), "engine": args.engine}
    for engine in args.also_engine or []:  # the main bundle on another decoder engine, side by side
        also[f"fromage_{engine}"] = {"bundle": str(bundle.directory.resolve()), "engine": engine}
    cache = Path(args.cache) if args.cache else cache_root()
    work = Path(tempfile.mkdtemp(prefix="fromage-bench-"))
    log(f"fromage bench: {bundle.directory} ({m['architecture']}, {m['num_layers']} layers), prompt {len(ids)} "
        f"tokens, {args.new_tokens} new tokens, image in prompt: {bool(args.images)}, batch 1, {threads} threads, "
        f"{args.runs} runs + {args.warmup} warm-up; worker logs in {work} (kept if a system fails)")

    load_before = list(os.getloadavg())  # a busy machine explains odd numbers
    weights = initializer_bytes(bundle.graph_path("decoder"))

    log(f"building/loading the retrieval index ({RET_INDEX_SIZE} random vectors) ...")
    ret_index = ensure_ret_index(m["retrieval_dim"], RET_INDEX_SIZE, cache, progress=False)
    spec = {"bundle": str(bundle.directory.resolve()), "lm": m["lm"], "model": m, "prompt_ids": ids,
            "image_at": len(bundle.tokens["prefix"]), "image": str(write_bench_image(work / "bench.png")),
            "new_tokens": args.new_tokens, "threads": threads,
            "retrieval_dim": m["retrieval_dim"], "ret_index": str(ret_index), "cache": str(cache), "also": also,
            "engine": args.engine}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_env(threads)
    if args.cache:
        env["FROMAGE_CACHE"] = str(cache)

    log(f"starting the memory-bandwidth probe ({threads} threads; measured once per round) ...")
    probe = Worker("bandwidth", [sys.executable, "-m", "fromage.runtime.bench", "bandwidth", str(threads)], env,
                   work / "bandwidth.log")
    try:
        array_bytes = probe.request(None)["info"]["array_bytes"]
    except WorkerError as e:
        probe.close()
        raise FromageError(f"the bandwidth probe failed: {e}") from None
    samples: list[dict] = []

    systems: dict[str, dict] = {}
    workers: dict[str, Worker] = {}
    ready: dict[str, dict] = {}
    names = ("fromage",) + tuple(also) + peers
    for name in names:
        try:
            if name in PREPARED_PEERS:
                log(f"preparing {name} (once; cached under {cache / 'peers'}) ...")
                prepare_peer(name, spec_path, env, work / f"{name}.prepare.log")
            log(f"loading {name} ...")
            w = Worker(name, worker_argv(name, spec_path), env, work / f"{name}.log")
            workers[name] = w
            ready[name] = w.request(None)
            if ready[name].get("info", {}).get("engine"):
                log(f"  {name}: decoder engine {ready[name]['info']['engine']}")
        except (WorkerError, subprocess.TimeoutExpired) as e:
            systems[name] = {"error": str(e)}
            log(f"  {name}: {e}")
            if name in workers:
                workers.pop(name).close()
    rounds: dict[str, list] = {n: [] for n in workers}
    try:
        total = args.warmup + args.runs
        for r in range(total):
            label = f"warm-up {r + 1}/{args.warmup}" if r < args.warmup else f"run {r - args.warmup + 1}/{args.runs}"
            for name in list(workers):
                time.sleep(SETTLE_S)
                t = time.perf_counter()
                try:
                    reply = workers[name].request({"cmd": "round", "images": bool(args.images)})
                except WorkerError as e:
                    systems[name] = {"error": str(e), "completed_runs": len(rounds[name])}
                    log(f"  {label} {name}: {e}")
                    workers.pop(name).close()
                    continue
                if r >= args.warmup:
                    rounds[name].append(reply)
                rate = reply.get("decode_tok_s")
                log(f"  {label} {name}: {time.perf_counter() - t:.1f} s"
                    + (f", {rate:.1f} tok/s decode" if rate else ""))
            time.sleep(SETTLE_S)
            try:  # the bandwidth, after the systems' runs of the round
                sample = probe.request({"cmd": "measure"})
            except WorkerError as e:
                raise FromageError(f"the bandwidth probe failed: {e}") from None
            samples += [sample] if r >= args.warmup else []
            log(f"  {label} memory bandwidth: {sample['gb_s']:.1f} GB/s ({sample['method']})")
    finally:
        for w in [*workers.values(), probe]:
            w.close()

    bandwidth = bandwidth_summary(samples, threads, array_bytes)
    roofline = bandwidth["gb_s"] * 1e9 / weights
    fromage_tokens = rounds["fromage"][-1]["tokens"] if rounds.get("fromage") else None
    for name, rs in rounds.items():
        if name not in systems and rs:
            systems[name] = summarize(rs, ready[name], None if name == "fromage" else fromage_tokens)
    base = systems.get("fromage", {})
    for name, s in systems.items():
        if "error" in s:
            continue
        if s.get("decode_tok_s"):
            s["roofline_fraction"] = s["decode_tok_s"] / roofline
            own = s.get("weights_bytes")
            if own and abs(own - weights) > 0.05 * weights:  # e.g. int4 weights
                s["own_weights_roofline_tok_s"] = bandwidth["gb_s"] * 1e9 / own
                s["own_weights_roofline_fraction"] = s["decode_tok_s"] / s["own_weights_roofline_tok_s"]
        if name != "fromage" and "error" not in base:
            s["vs_fromage"] = {k: (s[k] / base[k] if s.get(k) and base.get(k) else None)
                               for k in ("decode_tok_s", "tpot_ms", "ttft_ms", "ttft_image_ms", "e2e_ms",
                                         "peak_rss_mb")}
    ordered = {n: systems[n] for n in names if n in systems}
    if not any("error" in s for s in ordered.values()):
        shutil.rmtree(work, ignore_errors=True)
    return {
        "roofline_tok_s": roofline,
        "bandwidth_gb_s": bandwidth["gb_s"],
        "bandwidth": bandwidth,
        "weights_bytes_per_token": weights,
        "weights_how": "sum of the bytes of the decoder graph's initializers (fp32), read once per decoded token "
                       "(the rotary cos/sin tables, of which a step reads one row, excluded)",
        "settings": {
            "bundle": str(bundle.directory), "architecture": m["architecture"], "lm": m["lm"],
            "num_layers": m["num_layers"], "prompt_tokens": len(ids), "new_tokens": args.new_tokens,
            "images": int(args.images), "image_positions": m["k"], "batch": 1, "runs": args.runs,
            "warmup": args.warmup, "threads": threads, "peers": list(peers), "prompt_token_ids": ids,
            "decoding": "greedy, [RET] banned, no stop tokens: exactly new_tokens tokens per run",
            "order": f"systems interleaved run by run, each in its own subprocess, each round and the probe after a {SETTLE_S} s pause",
            "text_only_peers": "hf, optimum and the ORT GenAI peers take no image: their runs are text-only",
            "load_average": {"before": load_before, "after": list(os.getloadavg())},
            "retrieval_index": {"size": RET_INDEX_SIZE, "dim": m["retrieval_dim"], "top_k": 1},
            "definitions": {
                "ttft_ms": "prompt ids handed over -> first generated token id (prefill included), no image",
                "ttft_image_ms": "the same with the image after the prefix: image decode, preprocessing, "
                                 "encoder and prefill (text-only peers: null)",
                "tpot_ms": "(time of last token - time of first token) / (new_tokens - 1)",
                "decode_tok_s": "1000 / tpot_ms", "e2e_ms": "the whole main run",
                "image_encode_ms": "one image: decode + preprocessing + vision graph",
                "retrieval_ms": "one [RET] query (the decoder's retrieval embedding) against the index, top-1",
                "peak_rss_mb": "peak resident memory of the system's worker process (VmHWM)",
                "statistics": "median and p50/p90/p99 over the timed runs (inter_token_ms: over all tokens)"},
            "machine": _machine(), "versions": _versions(),
        },
        "systems": ordered,
    }


def resolve_peers(compare) -> tuple[str, ...]:
    if compare is None:
        return ()
    names = [n for item in compare for n in item.split(",") if n]
    if not names or names == ["all"]:
        return PEERS
    unknown = [n for n in names if n not in PEERS]
    if unknown:
        raise FromageError(f"unknown peer(s) {', '.join(unknown)} for --compare (choose from {', '.join(PEERS)})")
    return tuple(dict.fromkeys(names))


def _machine() -> dict:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores_available": default_threads(), "platform": platform.platform()}


def _versions() -> dict:
    import importlib.metadata as md
    out = {"python": platform.python_version()}
    for pkg in ("numpy", "onnxruntime", "tokenizers", "usearch", "torch", "transformers", "optimum",
                "optimum-onnx", "onnxruntime-genai"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


# ---- output ------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def format_table(result: dict) -> str:
    out = io.StringIO()
    if "systems" in result:
        s, bw = result["settings"], result["bandwidth"]
        print(f"\nmodel {s['lm']} ({s['architecture']}, {s['num_layers']} layers); prompt {s['prompt_tokens']} tokens"
              f"{' + an image' if s['images'] else ''}, {s['new_tokens']} new tokens, batch 1, {s['threads']} threads, "
              f"median of {s['runs']} runs", file=out)
        print(f"roofline {result['roofline_tok_s']:.1f} tok/s = read bandwidth {bw['gb_s']:.1f} GB/s "
              f"({bw['method']}, {bw['array_bytes'] / 2**30:.0f} GiB) / "
              f"{result['weights_bytes_per_token'] / 1e6:.1f} MB of decoder weights per token", file=out)
        head = ("system", "decode tok/s", "p90 tok/s", "x fromage", "roofline", "TPOT ms", "TTFT ms", "TTFT+img ms",
                "e2e s", "img enc ms", "retr ms", "peak MB", "same tok")
        rows = []
        for name, m in result["systems"].items():
            if "error" in m:
                rows.append((name, f"error: {m['error']}"))
                continue
            pct = m["percentiles"].get("decode_tok_s") or {}
            vs = (m.get("vs_fromage") or {}).get("decode_tok_s")
            same = m.get("agrees_with_fromage_tokens")
            rows.append((name, _fmt(m["decode_tok_s"]), _fmt(pct.get("p90")), _fmt(vs, ".2f") if vs else "1.00"
                         if name == "fromage" else "-", _fmt(m.get("roofline_fraction"), ".0%"), _fmt(m["tpot_ms"]),
                         _fmt(m["ttft_ms"]), _fmt(m["ttft_image_ms"]), _fmt(m["e2e_ms"], ".2f", 1e-3),
                         _fmt(m["image_encode_ms"]), _fmt(m["retrieval_ms"], ".2f"), _fmt(m["peak_rss_mb"], ".0f"),
                         "-" if same is None else f"{same}/{len(m['tokens'])}"))
        widths = [max(len(head[i]), *(len(r[i]) for r in rows if len(r) > 2)) for i in range(len(head))]
        print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(head, widths))), file=out)
        for r in rows:
            if len(r) == 2:
                print(f"{r[0].ljust(widths[0])}  {r[1][:300]}", file=out)
            else:
                print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))),
                      file=out)
        print("(decode tok/s = 1000/TPOT after the first token; TTFT includes the prefill; same tok = greedy tokens "
              "identical to fromage's, from the start)", file=out)
    if "retrieval" in result:
        r = result["retrieval"]
        print(f"\nretrieval: {r['vectors']} vectors of {r['dim']} dims, top-{r['k']}, {r['threads']} threads"
              f"{' (index loaded from cache)' if r['loaded_from_cache'] else ''}", file=out)
        head = ("method", "build s", "build vec/s", "memory MB", "queries", "QPS", "1-query p50 ms", "p99 ms",
                f"recall@{r['k']}")
        rows = []
        for name, m in r["methods"].items():
            rows.append((name, _fmt(m.get("build_s"), ".2f"), _fmt(m.get("build_vectors_per_s"), ".0f"),
                         _fmt(m.get("memory_bytes"), ".1f", 1e-6), str(m["queries"]), _fmt(m["qps"], ".0f"),
                         _fmt(m["single_query_ms"]["p50"], ".3f"), _fmt(m["single_query_ms"]["p99"], ".3f"),
                         _fmt(m["recall_at_10"], ".4f")))
        widths = [max(len(head[i]), *(len(x[i]) for x in rows)) for i in range(len(head))]
        for r_ in (head, *rows):
            print("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r_, widths))),
                  file=out)
    return out.getvalue()


def plot(result: dict, path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    systems = {n: m for n, m in result["systems"].items() if "error" not in m}
    names = list(systems)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    rates = [systems[n]["decode_tok_s"] or 0 for n in names]
    a.bar(names, rates, color=["tab:orange" if n == "fromage" else "tab:blue" for n in names])
    a.axhline(result["roofline_tok_s"], color="k", linestyle="--",
              label=f"fp32 roofline {result['roofline_tok_s']:.1f}")
    a.set_ylabel("decode tokens/s (median)")
    a.legend()
    ttft = [systems[n]["ttft_ms"] or 0 for n in names]
    b.bar(names, ttft, color="tab:green")
    b.set_ylabel("time to first token, ms (no image)")
    s = result["settings"]
    fig.suptitle(f"model {s['lm']}: prompt {s['prompt_tokens']}, {s['new_tokens']} new tokens, {s['threads']} threads")
    for ax in (a, b):
        ax.tick_params(axis="x", rotation=30)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(p) -> None:
    p.add_argument("--bundle", help="bundle to benchmark (optional with --retrieval only)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens, prefix included")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (no early stop)")
    p.add_argument("--images", type=int, choices=(0, 1), default=0,
                   help="1: an image after the prefix in the main runs (TTFT is measured with and without anyway)")
    p.add_argument("--batch", type=int, default=1, help="batch size (only 1 is supported)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per system")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, help="threads per system (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", metavar="FILE", help="PNG bar chart (needs matplotlib)")
    p.add_argument("--also", action="append", metavar="BUNDLE",
                   help="another bundle of the same model (e.g. `fromage export --quantize int4`), run as "
                        "fromage_<precision>[_fp32act] (repeatable)")
    from .cli import add_engine_argument
    add_engine_argument(p)
    p.add_argument("--also-engine", action="append", choices=("native", "onnxruntime"),
                   help="also run the bundle on this decoder engine, as fromage_<engine> (repeatable)")
    p.add_argument("--compare", nargs="*", metavar="PEER",
                   help=f"also run peers, interleaved run by run (default: all of {', '.join(PEERS)})")
    p.add_argument("--retrieval", type=int, metavar="N", help="benchmark the image index on N random vectors")
    p.add_argument("--dim", type=int, help="vector dims for --retrieval (default: the bundle's, else 256)")
    p.add_argument("--cache", help="cache folder for prepared peers and indexes (default: fromage's cache)")


def cmd_bench(args) -> None:
    if args.batch != 1:
        raise FromageError(f"--batch {args.batch}: only batch 1 is supported for now")
    if args.bundle is None and args.retrieval is None:
        raise FromageError("give --bundle (and/or --retrieval N)")
    for flag in ("runs", "prompt_tokens", "new_tokens"):
        if getattr(args, flag) < 1:
            raise FromageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise FromageError("--warmup must be >= 0 and --threads >= 1")
    if args.plot:
        if args.bundle is None:
            raise FromageError("--plot draws the decode benchmark: give --bundle")
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise FromageError("--plot needs matplotlib: pip install 'fromage[bench]'") from None
    resolve_peers(args.compare)  # fail early on a bad name
    for engine in args.also_engine or []:
        if engine == (args.engine if args.engine != "auto" else "native"):  # auto: native where it can
            raise FromageError(f"--also-engine {engine}: that is the main run's engine already (--engine {args.engine})")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    result: dict = {}
    if args.bundle is not None:
        result = run_bench(args, log=log)
    if args.retrieval is not None:
        from .bundle import load_bundle
        dim = args.dim or (load_bundle(args.bundle, verify=False).model["retrieval_dim"] if args.bundle else 256)
        cache = Path(args.cache) if args.cache else cache_root()
        result["retrieval"] = run_retrieval_bench(args.retrieval, dim, args.threads or default_threads(), cache,
                                                  log=log)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
        log(f"JSON written to {args.json}")
    if args.plot:
        plot(result, args.plot)
        log(f"plot written to {args.plot}")


def _module_main(argv: list[str]) -> int:
    """Subprocess entry points: `bandwidth THREADS` (the bandwidth probe) and `serve SPEC` (the fromage worker)."""
    if argv[:1] == ["bandwidth"]:
        return serve(lambda spec: BandwidthProbe(spec["threads"]), {"threads": int(argv[1])},
                     lambda probe, msg: probe.measure())
    if argv[:1] == ["serve"]:
        spec = json.loads(Path(argv[1]).read_text())
        if len(argv) > 2 and argv[2] != "fromage":  # an --also bundle or engine
            spec.update(spec["also"][argv[2]])
        return serve(FromageSystem, spec)
    print("usage: python -m fromage.runtime.bench (bandwidth THREADS | serve SPEC [SYSTEM])", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_module_main(sys.argv[1:]))
