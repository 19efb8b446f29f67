"""The native decoder's steps timed as `fromage bench --context` and `--batch` time them, and their tables."""
from __future__ import annotations

import statistics
import time

import numpy as np

from fromage.engines.huge_pages import cache_arrays

STEPS_PER_RUN = 10  # steps timed per setting and run, after one untimed (--batch)


def time_steps(settings: list, step, runs: int, log, label=str, after_run=None, steps: int = STEPS_PER_RUN) -> dict:
    """step(s) runs one decoder step at setting s. Per run: one untimed step of every setting, then `steps`
    rounds that each time one step of every setting in turn (neighbouring steps of different settings see a
    shared machine's moments alike); after_run() may add a measurement, its text ending the run's log line.
    -> {setting: [seconds]}, `steps` per run in run order."""
    times = {s: [] for s in settings}
    for r in range(runs):
        for s in settings:
            step(s)
        for _ in range(steps):
            for s in settings:
                t = time.perf_counter()
                step(s)
                times[s].append(time.perf_counter() - t)
        extra = after_run() if after_run else ""
        log(f"  run {r + 1}/{runs}: " + ", ".join(f"{label(s)}: {statistics.median(times[s][-steps:]) * 1e3:.2f} ms"
                                                 for s in settings) + extra)
    return times


def native_models(bundle, threads: int, kv_caches) -> dict:
    """{KV cache type: the bundle on the native engine with that cache}: --kv-cache f32,f16 side by side."""
    from fromage.runtime.generate import Fromage
    return {kv: Fromage(bundle, engine="native", threads=threads, kv_cache=kv) for kv in kv_caches}


def random_cache(rng, model, shape: tuple) -> list:
    """Random keys and values of `shape` for each of the model's layers, in its KV cache type, in memory such as
    the runtime gives a cache (engines/huge_pages.py)."""
    cache = cache_arrays(shape, model.kv_dtype, 2 * model.layers)
    for c in cache:
        c[...] = rng.standard_normal(shape, dtype=np.float32)
    return cache


def kv_label(kv_caches, kv: str, text: str) -> str:
    """A step's name in the runs' log: its KV cache type too when several are compared."""
    return f"{kv} {text}" if len(kv_caches) > 1 else text


def ms_per_op(decoder, step, setting, steps: int) -> dict:
    """step(setting) run `steps` times with the native decoder's per-operation clock on (--ops): -> {operation:
    ms per step}."""
    passes, seconds = decoder.op_times(lambda: [step(setting) for _ in range(steps)])
    return {op: s / passes * 1e3 for op, s in seconds.items()}


def format_rows(title: str, columns: list[tuple[str, str, str]], rows: list[dict]) -> str:
    """A table: columns (header, row key, format spec), each cell right-aligned under its header
    ('-' for None)."""
    lines = [title, "   ".join(h for h, _, _ in columns)]
    for row in rows:
        lines.append("   ".join(("-" if row[k] is None else format(row[k], spec)).rjust(len(h)) for h, k, spec in columns))
    return "\n".join(lines)
