"""`fromage bench`: the numbers users measure first (cf. trtexec, llama-bench, optimum-benchmark).

Batch-1 greedy decoding with [RET] banned and no stop tokens, so every run decodes exactly
--new-tokens tokens after a prompt of exactly --prompt-tokens tokens. Each system (fromage and,
with --compare, the peers of `fromage.tools.bench_peers`) runs in its own worker subprocess,
loaded once; the timed runs are interleaved round by round (A B C A B C ...) so that the noise
of a shared machine hits every system alike. The memory-bandwidth roofline is measured between them:
a probe subprocess reads a 1 GiB array (numpy's reads and the native ones) before and after every run,
and each run is held against the mean of the two. `--retrieval N` benchmarks the image index on N
random clustered vectors; `--context N,N` times the native decode step at long cache lengths instead of
the decode bench (tools/bench_context.py), `--batch N,N` its batched step with N sequences
(tools/bench_batch.py).

This module never imports torch or transformers: the peers that need them import them in their own processes.
"""
from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from fromage.engines.base import default_threads

from .bench_retrieval import build_vector_index, clustered_vectors, run_retrieval_bench
from fromage.runtime.errors import FromageError
from fromage.training.backbones import cache_root  # torch-free
from fromage.engines.onnx_weights import initializer_bytes

from .bench_report import bandwidth_summary, format_table, plot, summarize
from .bench_peers import PREPARE, SYSTEMS
from .bench_worker import prompt_ids, round_trip_text, write_bench_image
from .options import kv_cache_list


PEERS = tuple(SYSTEMS)  # PREPARE: the peers with a one-time preparation (an export, a build), cached
RET_INDEX_SIZE = 10_000  # vectors in the index the fromage [RET] query is timed against
WORKER_TIMEOUT_S = 3600


# ---- small helpers -----------------------------------------------------------------------------
# a pause before each system's round and the probe: the previous process's idle thread pools (ONNX
# Runtime, OpenBLAS) spin for a while after their work, and took the cores from the next system's prefill
SETTLE_S = 0.25


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
        return [sys.executable, "-m", "fromage.tools.bench_worker", "serve", str(spec_path), system]
    return [sys.executable, "-m", "fromage.tools.bench_peers", system, "--spec", str(spec_path), "--serve"]


def prepare_peer(system: str, spec_path: Path, env: dict, log_path: Path) -> None:
    """One-time preparation (ONNX export, ORT GenAI model build), cached under cache_root()/peers."""
    with open(log_path, "w") as log:
        proc = subprocess.run([sys.executable, "-m", "fromage.tools.bench_peers", system, "--spec",
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


def run_bench(args, log=print) -> dict:
    from tokenizers import Tokenizer
    from fromage.runtime.bundle_reader import load_bundle
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
            "engine": args.engine, "kv_cache": kv_cache_list(args.kv_cache)[0]}
    spec_path = work / "spec.json"
    spec_path.write_text(json.dumps(spec))
    env = worker_env(threads)
    if args.cache:
        env["FROMAGE_CACHE"] = str(cache)

    log(f"starting the memory-bandwidth probe ({threads} threads; measured before and after every run) ...")
    probe = Worker("bandwidth", [sys.executable, "-m", "fromage.tools.bench_worker", "bandwidth", str(threads)], env,
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
            if name in PREPARE:
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

    def measure(label: str) -> dict:
        time.sleep(SETTLE_S)
        try:
            sample = probe.request({"cmd": "measure"})
        except WorkerError as e:
            raise FromageError(f"the bandwidth probe failed: {e}") from None
        log(f"  {label} memory bandwidth: {sample['gb_s']:.1f} GB/s ({sample['method']})"
            + (f"; FMA loop {sample['fma_gflop_s']:.0f} GFLOP/s" if sample.get("fma_gflop_s") else "")
            + round_trip_text(sample.get("round_trip_ns")))
        return sample
    try:
        total = args.warmup + args.runs
        # the memory's speed moves within a minute on shared machines: measured before and after every run, so that
        # each run is held against the bandwidth of its own moment (a run's: the mean of the two)
        before = measure("before the runs:")
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
                rate = reply.get("decode_tok_s")
                log(f"  {label} {name}: {time.perf_counter() - t:.1f} s"
                    + (f", {rate:.1f} tok/s decode" if rate else ""))
                after = measure(f"{label} after {name}:")
                if r >= args.warmup:
                    reply["bandwidth_gb_s"] = (before["gb_s"] + after["gb_s"]) / 2
                    if before.get("round_trip_ns") and after.get("round_trip_ns"):
                        reply["round_trip_ns"] = (before["round_trip_ns"] + after["round_trip_ns"]) / 2
                    rounds[name].append(reply)
                    samples.append(after)
                before = after
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
            own = s.get("weights_bytes")
            own = own if own and abs(own - weights) > 0.05 * weights else None  # e.g. int4 weights
            if own:
                s["own_weights_roofline_tok_s"] = bandwidth["gb_s"] * 1e9 / own
            # each run against the bandwidth of its own moment (measured before and after it); the headline: the median
            runs = [r for r in rounds[name] if r.get("decode_tok_s")]
            s["bandwidth_runs_gb_s"] = [r["bandwidth_gb_s"] for r in runs]
            s["round_trip_runs_ns"] = [r.get("round_trip_ns") for r in runs]
            for key, nbytes in (("roofline_fraction", weights), ("own_weights_roofline_fraction", own)):
                if nbytes:
                    s[key + "_runs"] = [r["decode_tok_s"] * nbytes / (r["bandwidth_gb_s"] * 1e9) for r in runs]
                    s[key] = float(np.median(s[key + "_runs"]))
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
            "kv_cache": spec["kv_cache"],
            "warmup": args.warmup, "threads": threads, "peers": list(peers), "prompt_token_ids": ids,
            "decoding": "greedy, [RET] banned, no stop tokens: exactly new_tokens tokens per run",
            "order": f"systems interleaved run by run, each in its own subprocess, the probe after each run, each after a "
                     f"{SETTLE_S} s pause",
            "text_only_peers": "hf, optimum, the ORT GenAI and the llama.cpp peers take no image: their runs are text-only",
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
            "machine": machine_info(), "versions": _versions(),
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


def machine_info() -> dict:
    """The CPU, its vector flags and the native kernels it runs: recorded with every benchmark."""
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    out = {"cpu": cpu, "cores_available": default_threads(), "platform": platform.platform()}
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        out["cpu_flags"] = sorted(f for f in flags.split(":", 1)[1].split()
                                  if f.startswith(("avx", "fma", "f16c", "amx")))
    except (OSError, StopIteration):
        pass
    from fromage.engines import native
    try:  # the copy of the native kernels this machine runs (FROMAGE_KERNELS, inherited by the workers, forces one)
        out["kernels"] = native.kernels_in_use()
    except FromageError as e:
        out["kernels"] = None
        out["kernels_note"] = str(e)
    return out


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


def add_arguments(p) -> None:
    p.add_argument("--bundle", help="bundle to benchmark (optional with --retrieval only)")
    p.add_argument("--prompt-tokens", type=int, default=32, help="prompt length in tokens, prefix included")
    p.add_argument("--new-tokens", type=int, default=128, help="tokens decoded per run (no early stop)")
    p.add_argument("--images", type=int, choices=(0, 1), default=0,
                   help="1: an image after the prefix in the main runs (TTFT is measured with and without anyway)")
    p.add_argument("--batch", metavar="N,N", help="instead of the decode bench: the native engine's batched decode "
                   "step with these numbers of sequences (e.g. 1,8,16): aggregate tok/s and the matrices' GFLOP/s")
    p.add_argument("--ops", action="store_true", help="with --batch: also where a step goes, each operation timed "
                   "(norms, matrices, rope, attention, SiLU, head); with --context: the attention operation itself")
    p.add_argument("--runs", type=int, default=5, help="timed runs per system")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=int, help="threads per system (default: all cores)")
    p.add_argument("--json", metavar="FILE", help="write every number as JSON")
    p.add_argument("--plot", metavar="FILE", help="PNG bar chart (needs matplotlib)")
    p.add_argument("--also", action="append", metavar="BUNDLE",
                   help="another bundle of the same model (e.g. `fromage export --quantize int4`), run as "
                        "fromage_<precision>[_fp32act] (repeatable)")
    from .options import add_engine_argument, add_kv_cache_argument
    add_engine_argument(p)
    add_kv_cache_argument(p, several="with --batch or --context, f32,f16 runs both side by side")
    p.add_argument("--also-engine", action="append", choices=("native", "onnxruntime"),
                   help="also run the bundle on this decoder engine, as fromage_<engine> (repeatable)")
    p.add_argument("--compare", nargs="*", metavar="PEER",
                   help=f"also run peers, interleaved run by run (default: all of {', '.join(PEERS)})")
    p.add_argument("--retrieval", type=int, metavar="N", help="benchmark the image index on N random vectors")
    p.add_argument("--context", metavar="N,N", help="instead of the decode bench: the native decode step at these "
                   "cache lengths (e.g. 1024,4096), its attention time against the KV bytes / the bandwidth")
    p.add_argument("--dim", type=int, help="vector dims for --retrieval (default: the bundle's, else 256)")
    p.add_argument("--cache", help="cache folder for prepared peers and indexes (default: fromage's cache)")


def cmd_bench(args) -> None:
    if args.bundle is None and args.retrieval is None:
        raise FromageError("give --bundle (and/or --retrieval N)")
    for flag in ("runs", "prompt_tokens", "new_tokens"):
        if getattr(args, flag) < 1:
            raise FromageError(f"--{flag.replace('_', '-')} must be at least 1")
    if args.warmup < 0 or (args.threads is not None and args.threads < 1):
        raise FromageError("--warmup must be >= 0 and --threads >= 1")
    for flag in ("context", "batch"):
        if getattr(args, flag) is not None and (args.plot or args.compare is not None or args.also or args.also_engine):
            raise FromageError(f"--{flag} times the native decoder alone: without --plot, --compare, --also, --also-engine")
    if args.context is not None and args.batch is not None:
        raise FromageError("--context and --batch are two separate benches: give one")
    if args.ops and args.batch is None and args.context is None:
        raise FromageError("--ops times the operations of --batch's or --context's steps: give one of them")
    kv_caches = kv_cache_list(args.kv_cache)
    if len(kv_caches) > 1 and args.batch is None and args.context is None:
        raise FromageError("--kv-cache takes one type, except with --batch or --context (which compare them)")
    from fromage.runtime.generate import check_decoder_options
    for engine in [args.engine] + (args.also_engine or []):
        for kv in kv_caches:
            check_decoder_options(engine, kv)
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
    if args.context is not None or args.batch is not None:  # the native decoder alone
        if args.context is not None:
            from .bench_context import parse_lengths as parse, run_context_bench as run
            key, text = "context", args.context
        else:
            from .bench_batch import parse_batches as parse, run_batch_bench as run
            key, text = "batch", args.batch
        if args.bundle is None:
            raise FromageError(f"--{key} needs --bundle")
        result[key] = run(args.bundle, parse(text), args.threads or default_threads(), args.runs, log=log, ops=args.ops,
                          kv_caches=kv_caches)
    elif args.bundle is not None:
        result = run_bench(args, log=log)
    if args.retrieval is not None:
        from fromage.runtime.bundle_reader import load_bundle
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


