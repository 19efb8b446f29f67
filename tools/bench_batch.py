"""`fromage bench --batch 1,8,16`: the native engine's batched decode step (fm_forward_rows, what the server
runs for greedy requests), B sequences each at BATCH_POSITIONS cached positions of its own cache (fewer in a
model with a shorter context), one decoder call per step; with several KV cache types (--kv-cache f32,f16),
each on its own decoder, their steps interleaved.
Aggregate tokens/s = B / step; the arithmetic rate counts the matrices' 2 x weights x B flops per step (the
step's attention, norms and head included in its time)."""
from __future__ import annotations

import statistics

import numpy as np

from .bench_steps import STEPS_PER_RUN, format_rows, kv_label, ms_per_op, native_models, random_cache, time_steps
from .bench_worker import core_round_trip, fma_probe, round_trip_text
from .options import int_list

BATCH_POSITIONS = 128


def parse_batches(text: str) -> list[int]:
    return int_list(text, "--batch", "1,8,16", 1, 256)


def matrix_weights(m, vocab: int) -> int:
    """Weights of the decoder's matrices read per step (layers and head), from the model's shapes."""
    e, d = m.hidden, m.head_dim
    layer = e * (m.n_heads + 2 * m.n_kv) * d + m.n_heads * d * e + e * 2 * m.inter + m.inter * e
    return m.n_layers * layer + e * vocab


def run_batch_bench(bundle, batches: list[int], threads: int, runs: int, log=print, ops: bool = False,
                    kv_caches: tuple = ("f32",)) -> dict:
    from fromage.runtime.generate import cache_capacity
    models = native_models(bundle, threads, kv_caches)
    decoders = {kv: model.decoder for kv, model in models.items()}
    model, dec = models[kv_caches[0]], decoders[kv_caches[0]]
    m = dec.model
    positions = min(BATCH_POSITIONS, min(m.rope_positions, model.max_positions) // 2)
    rng = np.random.default_rng(0)
    shape = (1, m.n_kv, cache_capacity(dec, positions + 1), m.head_dim)
    caches = {kv: [random_cache(rng, mk, shape) for _ in range(batches[-1])] for kv, mk in models.items()}
    embeds = (rng.standard_normal((batches[-1], m.hidden)) * 0.02).astype(np.float32)
    outputs = {b: (np.empty((b, dec.vocab_size), np.float32), np.empty((b, dec.retrieval_dim), np.float32))
               for b in batches}
    settings = [(kv, b) for kv in kv_caches for b in batches]
    # greedy rows, as the server runs temperature-0 requests (an fp32 head: its 8-bit copy, native/head_top.c)
    def run_step(setting):
        kv, b = setting
        decoders[kv].forward_batch(embeds[:b], caches[kv][:b], [positions] * b, *outputs[b], top=[1] * b)
    fma, fma_rates, trips = fma_probe(dec.lib), [], []

    def measure_fma() -> str:  # the cores' arithmetic rate and round trip once per run, between the steps (they move)
        fma_rates.append(fma())
        trips.append(core_round_trip(dec.lib))
        return f"; FMA loop {fma_rates[-1]:.0f} GFLOP/s" + round_trip_text(trips[-1])
    steps = time_steps(settings, run_step, runs, log, label=lambda s: kv_label(kv_caches, s[0], f"B={s[1]}"),
                       after_run=measure_fma)
    weights = matrix_weights(m, dec.vocab_size)
    rows = []
    for kv, b in settings:
        step = statistics.median(steps[kv, b])
        rows.append({"kv_cache": kv, "batch": b, "step_ms": step * 1e3, "tok_s": b / step,
                     "gflop_s": 2 * weights * b / step / 1e9,
                     "of_fma_loop": 2 * weights * b / step / 1e9 / statistics.median(fma_rates)})
    if ops:  # where a step goes: the same steps again, each operation timed (the step times above are without)
        for row in rows:
            row["ops_ms"] = ms_per_op(decoders[row["kv_cache"]], run_step, (row["kv_cache"], row["batch"]),
                                      runs * STEPS_PER_RUN)
    for row in rows:
        one = next((r["tok_s"] for r in rows if r["batch"] == 1 and r["kv_cache"] == row["kv_cache"]), None)
        row["x_batch_1"] = row["tok_s"] / one if one else None
    return {"kernels": dec.kernels, "threads": threads, "runs": runs, "steps_per_run": STEPS_PER_RUN,
            "positions": positions, "matrix_weights": weights, "batches": rows,
            "fma_gflop_s": statistics.median(fma_rates), "fma_runs_gflop_s": fma_rates, "round_trip_runs_ns": trips,
            "decoding": "greedy rows (an fp32 head: its 8-bit copy and the few panels that can hold the largest)",
            "note": "tok_s = batch / median step; gflop_s = 2 x matrix_weights x batch / median step; of_fma_loop = "
                    "gflop_s / fma_gflop_s, the native FMA loop on registers (fm_fma_loop) with as many threads, "
                    "measured after each run: the most arithmetic the cores gave at the time"}


def format_batch(result: dict) -> str:
    first = [("KV cache", "kv_cache", "s"), ("batch", "batch", "d")]
    table = format_rows(f"batched decode steps ({result['kernels']} kernels, {result['threads']} threads, each sequence at "
                       f"{result['positions']} positions, median of {result['runs']} x {result['steps_per_run']} steps; "
                       f"{result['matrix_weights'] / 1e6:.1f} M matrix weights; the FMA loop on registers "
                       f"{result['fma_gflop_s']:.0f} GFLOP/s)",
                       first + [("step ms", "step_ms", ".2f"), ("tok/s", "tok_s", ".1f"),
                                ("x batch 1", "x_batch_1", ".2f"), ("matrix GFLOP/s", "gflop_s", ".1f"),
                                ("of FMA loop", "of_fma_loop", ".0%")], result["batches"])
    if "ops_ms" not in result["batches"][0]:
        return table
    ops = list(result["batches"][0]["ops_ms"])
    rows = [{**r, **r["ops_ms"], "sum": sum(r["ops_ms"].values())} for r in result["batches"]]
    return table + "\n\n" + format_rows("where a step goes (--ops: ms per step, the same steps timed per operation)",
                                        first + [(op, op, ".2f") for op in ops + ["sum"]], rows)
