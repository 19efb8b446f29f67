"""`fromage bench --context 1024,4096`: the decode step at long contexts on the native engine. A step's
attention share is the step at N cached positions minus the step at BASE_POSITIONS; its bound is the KV
cache's bytes (every layer's keys and values, each read once) ÷ the memory bandwidth, measured between
the steps as the main bench measures it: before the first run and after each, a run held against the mean of
the two beside it (the machine's bandwidth moves from minute to minute). The table gives the medians over runs,
and over the steady runs alone: those whose two bandwidths agree within STEADY (where the cores move between
caches within seconds, a run whose bandwidth changed during its steps has no bound of its own). With several
KV cache types (--kv-cache f32,f16), each runs on its own decoder, their steps interleaved, each against its own
bytes."""
from __future__ import annotations

import statistics

import numpy as np

from fromage.runtime.errors import FromageError

from .bench_steps import format_rows, kv_label, ms_per_op, native_models, random_cache, time_steps
from .options import int_list

BASE_POSITIONS = 16
STEPS = 20  # per setting and run: a few milliseconds of attention is a difference of two ~15 ms steps
STEADY = 1.2  # the most a steady run's bandwidth after it may differ from before it (a ratio)


def parse_lengths(text: str) -> list[int]:
    return int_list(text, "--context", "1024,4096", BASE_POSITIONS + 1)


def run_context_bench(bundle, lengths: list[int], threads: int, runs: int, log=print, ops: bool = False,
                      kv_caches: tuple = ("f32",)) -> dict:
    from fromage.runtime.generate import cache_capacity
    from .bench_worker import MachineProbe, round_trip_text
    models = native_models(bundle, threads, kv_caches)
    model, dec = models[kv_caches[0]], models[kv_caches[0]].decoder
    m = dec.model
    if lengths[-1] + 1 > min(m.rope_positions, model.max_positions):
        raise FromageError(f"--context {lengths[-1]}: the model's context is {model.max_positions} positions")
    rng = np.random.default_rng(0)
    shape = (1, m.n_kv, cache_capacity(dec, lengths[-1] + 1), m.head_dim)
    caches = {kv: random_cache(rng, mk, shape) for kv, mk in models.items()}
    embeds = (rng.standard_normal((1, 1, m.hidden)) * 0.02).astype(np.float32)
    logits, ret = np.zeros(dec.vocab_size, np.float32), np.zeros(dec.retrieval_dim, np.float32)
    probe = MachineProbe(threads, arithmetic=False)  # the bandwidth alone: attention's bound
    points = [(kv, p) for kv in kv_caches for p in [BASE_POSITIONS] + lengths]
    probes, trips = [], []  # the bandwidth and the cores' round trip before the first run and after each

    def measure() -> str:
        sample = probe.measure()
        probes.append(sample["gb_s"])
        trips.append(sample.get("round_trip_ns"))
        return f"bandwidth {probes[-1]:.1f} GB/s" + round_trip_text(trips[-1])
    def run_step(point):
        kv, p = point
        models[kv].decoder.forward(embeds, caches[kv], p, logits, ret)
    log("  before the runs: " + measure())
    steps = time_steps(points, run_step, runs, log, label=lambda s: kv_label(kv_caches, s[0], str(s[1])),
                       after_run=lambda: "; " + measure(), steps=STEPS)
    bandwidth = [(a + b) / 2 for a, b in zip(probes, probes[1:])]
    steady = [max(a, b) / min(a, b) <= STEADY for a, b in zip(probes, probes[1:])]

    def run_medians(point) -> list[float]:  # each run's median step: a run's steps and its bandwidth go together
        return [statistics.median(steps[point][r * STEPS:(r + 1) * STEPS]) for r in range(runs)]
    rows = []
    for kv in kv_caches:
        base = run_medians((kv, BASE_POSITIONS))
        for p in lengths:
            kv_bytes = 2 * m.n_layers * m.n_kv * (p + 1) * m.head_dim * models[kv].kv_dtype.itemsize
            attention = [s - b for s, b in zip(run_medians((kv, p)), base)]
            bounds = [kv_bytes / (gb * 1e9) for gb in bandwidth]
            ratios = [a / b for a, b in zip(attention, bounds)]
            steady_ratios = [x for x, ok in zip(ratios, steady) if ok]
            rows.append({"kv_cache": kv, "positions": p, "step_ms": statistics.median(steps[kv, p]) * 1e3,
                         "attention_ms": statistics.median(attention) * 1e3, "kv_mb": kv_bytes / 1e6,
                         "bound_ms": statistics.median(bounds) * 1e3, "x_bound": statistics.median(ratios),
                         "x_bound_steady": statistics.median(steady_ratios) if steady_ratios else None,
                         "x_bound_runs": ratios, "base_step_ms": statistics.median(steps[kv, BASE_POSITIONS]) * 1e3})
            if ops:  # the attention itself, timed inside the same steps run again (not a difference of two steps)
                rows[-1]["attention_op_ms"] = ms_per_op(models[kv].decoder, run_step, (kv, p), runs * STEPS)["attention"]
                rows[-1]["x_bound_op"] = rows[-1]["attention_op_ms"] / rows[-1]["bound_ms"]
    return {"kernels": dec.kernels, "threads": threads, "runs": runs, "steps_per_run": STEPS,
            "bandwidth_gb_s": statistics.median(bandwidth), "bandwidth_runs_gb_s": bandwidth,
            "bandwidth_probes_gb_s": probes, "steady_runs": steady, "round_trip_runs_ns": trips[1:],
            "base_positions": BASE_POSITIONS,
            "lengths": rows,
            "note": f"per run: attention = its median step at N positions - its median step at {BASE_POSITIONS}, "
                    "bound = KV bytes / the mean of the bandwidths measured before and after its steps, x = attention / "
                    "bound; the table gives the medians over runs (x_bound_runs: every run's x), x_bound_steady over the "
                    f"runs whose two bandwidths agree within {STEADY}x (steady_runs; None: no such run); with --ops, "
                    "attention_op_ms is the attention operation itself (fm_profile), x_bound_op = it / the median bound"}


def format_context(result: dict) -> str:
    ops = [("attention op ms", "attention_op_ms", ".2f"), ("x bound (op)", "x_bound_op", ".2f")] \
        if "attention_op_ms" in result["lengths"][0] else []
    steady = sum(result["steady_runs"])
    return format_rows(f"long context ({result['kernels']} kernels, {result['threads']} threads, {result['runs']} runs "
                       f"of {result['steps_per_run']} steps, medians over runs; bandwidth {result['bandwidth_gb_s']:.1f} "
                       f"GB/s; attention = the step minus the step at {result['base_positions']} positions; steady runs: "
                       f"{steady} of {result['runs']}, the bandwidth after within {STEADY}x of before)",
                       [("KV cache", "kv_cache", "s"), ("positions", "positions", "d"), ("step ms", "step_ms", ".2f"),
                        ("base step ms", "base_step_ms", ".2f"),
                        ("attention ms", "attention_ms", ".2f"), ("KV MB", "kv_mb", ".1f"),
                        ("KV bytes / bandwidth ms", "bound_ms", ".2f"), ("x that bound", "x_bound", ".2f"),
                        ("x (steady runs)", "x_bound_steady", ".2f")] + ops,
                       result["lengths"])
