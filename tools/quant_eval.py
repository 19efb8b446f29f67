"""`fromage eval quantized`: what quantization costs, against the fp32 bundle of the same model (or what an
f16 KV cache costs: `--kv-cache f16`, the bundle's own KV cache, the reference's f32).

- Greedy agreement: for each of N held-out prompts (held-out TuxPaint captions, phrased as a
  request), both bundles decode T tokens greedily with no stop token and retrieval off; a prompt
  agrees when all T token ids are identical. The first differing position is reported.
- Perplexity on held-out text: the held-out captions after the model's prefix, scored by each bundle.
"""
from __future__ import annotations

import json
import sys
import time

from fromage.runtime.errors import FromageError


def prompts_from(heldout, n: int) -> list[str]:
    """Evenly spaced held-out captions, phrased as requests."""
    if n < 1:
        raise FromageError("--prompts must be at least 1")
    step = max(1, len(heldout) // n)
    return [f"Tell me about this: {e.caption}" for e in heldout[::step][:n]]


def greedy_agreement(model, reference, prompts: list[str], tokens: int) -> dict:
    from fromage.runtime.sampling import SamplingParams
    params = SamplingParams(max_new_tokens=tokens, temperature=0.0, stop_ids=[], retrieval=False)
    rows = []
    for prompt in prompts:
        ours = model.generate([prompt], params).token_ids
        ref = reference.generate([prompt], params).token_ids
        first = next((i for i, (a, b) in enumerate(zip(ours, ref)) if a != b), None)
        rows.append({"prompt": prompt, "identical": ours == ref, "first_difference": first})
    return {"prompts": len(rows), "tokens": tokens, "identical": sum(r["identical"] for r in rows), "rows": rows}


def run(bundle, reference, *, tuxpaint, n_prompts=10, tokens=32, threads=None, device="cpu", verify=True,
        progress=False, engine="auto", kv_cache="f32") -> dict:
    from fromage.runtime.scoring import caption_perplexity
    from fromage.runtime.sources import load_split
    from fromage.runtime.generate import Fromage
    _, heldout, info = load_split(tuxpaint)
    model = Fromage(bundle, device=device, threads=threads, verify=verify, engine=engine, kv_cache=kv_cache)
    ref = Fromage(reference, device=device, threads=threads, verify=verify, engine=engine)
    if model.bundle.model["lm"] != ref.bundle.model["lm"] or model.vocab_size != ref.vocab_size:
        raise FromageError(f"{bundle} and {reference} are not the same model")
    out = {"bundle": str(bundle), "precision": model.bundle.manifest.get("precision"), "engine": model.engine,
           "kv_cache": kv_cache,
           "reference": str(reference), "reference_precision": ref.bundle.manifest.get("precision"),
           "data": info}
    out["greedy"] = greedy_agreement(model, ref, prompts_from(heldout, n_prompts), tokens)
    out["perplexity"] = caption_perplexity(model, heldout, None, progress)[0]
    out["reference_perplexity"] = caption_perplexity(ref, heldout, None, progress)[0]
    return out


def cmd_eval_quantized(args) -> None:
    t0 = time.perf_counter()
    result = run(args.bundle, args.reference, tuxpaint=args.tuxpaint, n_prompts=args.prompts, tokens=args.tokens,
                 threads=args.threads, device=args.device, verify=not args.no_verify, progress=sys.stderr.isatty(),
                 engine=args.engine, kv_cache=args.kv_cache)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
        return
    g = result["greedy"]
    print(f"{result['precision']} bundle ({result['kv_cache']} KV cache) vs {result['reference_precision']} reference, "
          f"{g['prompts']} held-out prompts x {g['tokens']} greedy tokens:")
    print(f"  identical: {g['identical']} / {g['prompts']}")
    for r in g["rows"]:
        if not r["identical"]:
            print(f"  differs from token {r['first_difference']}: {r['prompt']!r}")
    if result["perplexity"] is not None:
        print(f"  held-out caption perplexity: {result['perplexity']:.3f} "
              f"(reference {result['reference_perplexity']:.3f})")
    print(f"({time.perf_counter() - t0:.0f} s)")
