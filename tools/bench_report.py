"""The report of `fromage bench`: per-system summaries of the timed rounds, the table, the plot."""
from __future__ import annotations

import io

import numpy as np

from .bench_batch import format_batch
from .bench_context import format_context
from .bench_worker import BANDWIDTH_PASSES


def percentiles(values) -> dict | None:
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    a = np.asarray(vals)
    return {"median": float(np.median(a)), "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "min": float(a.min()), "max": float(a.max()), "runs": vals}


def bandwidth_summary(samples: list[dict], threads: int, array_bytes: int) -> dict:
    """The roofline's bandwidth: the median of the probe's measurements after the timed runs (each its fastest
    read's)."""
    best = [s["gb_s"] for s in samples]
    winners = [s["method"] for s in samples]
    fma = [s["fma_gflop_s"] for s in samples if s.get("fma_gflop_s")]
    trips = [s["round_trip_ns"] for s in samples if s.get("round_trip_ns")]

    def median_of(key):
        return {name: float(np.median([s[key][name] for s in samples])) for name in samples[0][key]}
    return {"gb_s": float(np.median(best)), "per_probe_gb_s": best, "max_gb_s": max(best),
            "fma_gflop_s": float(np.median(fma)) if fma else None, "per_probe_fma_gflop_s": fma,
            "per_probe_round_trip_ns": trips,
            "method": max(set(winners), key=winners.count), "methods_gb_s": median_of("methods_gb_s"),
            "methods_peak_gb_s": median_of("methods_peak_gb_s"), "threads": threads, "array_bytes": array_bytes,
            "how": (f"before and after every run, {BANDWIDTH_PASSES} passes of each read over one "
                    f"{array_bytes / 2**30:.2f} GiB float32 array with {threads} thread(s); a measurement is the "
                    "fastest read's mean rate over its passes (methods_peak_gb_s: their single fastest passes); "
                    "a run's bandwidth (systems.*.bandwidth_runs_gb_s) is the mean of the measurements before and "
                    "after it, the roofline's the median of those after the timed runs (per_probe_gb_s); "
                    "fma_gflop_s: the native FMA loop on registers with as many threads, after each read (the "
                    "cores' arithmetic rate); per_probe_round_trip_ns: the first two threads' cache-line round trip "
                    "(one L3: ~60 ns; two: several times that), a run's (systems.*.round_trip_runs_ns) the mean of "
                    "the measurements before and after it")}


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


# ---- output ------------------------------------------------------------------------------------------
def _fmt(v, spec: str = ".1f", scale: float = 1.0) -> str:
    return "-" if v is None else format(v * scale, spec)


def _fractions(values) -> str:
    return " / ".join(f"{f:.0%}" for f in values)


def format_table(result: dict) -> str:
    out = io.StringIO()
    if "context" in result:
        print(format_context(result["context"]), file=out)
    if "batch" in result:
        print(format_batch(result["batch"]), file=out)
    if "systems" in result:
        s, bw = result["settings"], result["bandwidth"]
        print(f"\nmodel {s['lm']} ({s['architecture']}, {s['num_layers']} layers); prompt {s['prompt_tokens']} tokens"
              f"{' + an image' if s['images'] else ''}, {s['new_tokens']} new tokens, batch 1, {s['threads']} threads, "
              f"median of {s['runs']} runs", file=out)
        print(f"roofline {result['roofline_tok_s']:.1f} tok/s = read bandwidth {bw['gb_s']:.1f} GB/s "
              f"({bw['method']}, {bw['array_bytes'] / 2**30:.0f} GiB) / "
              f"{result['weights_bytes_per_token'] / 1e6:.1f} MB of decoder weights per token", file=out)
        # shared machines: how fast memory and the cores were, and each run against the bandwidth of its moment
        print("after each run: memory " + " / ".join(f"{g:.0f}" for g in bw["per_probe_gb_s"]) + " GB/s"
              + (", FMA loop " + " / ".join(f"{g:.0f}" for g in bw["per_probe_fma_gflop_s"]) + " GFLOP/s"
                 if bw.get("per_probe_fma_gflop_s") else "")
              + (", cores' round trip " + " / ".join(f"{g:.0f}" for g in bw["per_probe_round_trip_ns"]) + " ns"
                 if bw.get("per_probe_round_trip_ns") else ""), file=out)
        for name, m in result["systems"].items():
            if m.get("roofline_fraction_runs"):
                own = m.get("own_weights_roofline_fraction_runs")
                trips = m.get("round_trip_runs_ns") or []
                print(f"  {name}: {_fractions(m['roofline_fraction_runs'])} of its runs' rooflines"
                      + (f" (own {_fractions(own)})" if own else "")
                      + (" at round trips " + " / ".join(f"{t:.0f}" for t in trips) + " ns" if all(trips) and trips
                         else ""), file=out)
        mach = s.get("machine") or {}
        if mach.get("kernels"):  # which copy of the native kernels ran (chosen by the CPU, or FROMAGE_KERNELS)
            print(f"native kernels: {mach['kernels']} on {mach.get('cpu')} ({' '.join(mach.get('cpu_flags') or [])})",
                  file=out)
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
                         if name == "fromage" else "-", _fmt(m.get("roofline_fraction"), ".0%")
                         + (f" (own {m['own_weights_roofline_fraction']:.0%})" if m.get("own_weights_roofline_fraction")
                            else ""), _fmt(m["tpot_ms"]),
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
        print("(decode tok/s = 1000/TPOT after the first token; roofline: the median over the runs of each run's "
              "decode rate against the bandwidth measured before and after it; TTFT includes the prefill; same tok = "
              "greedy tokens identical to fromage's, from the start)", file=out)
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


