"""The `fromage` command. Parsers live here; torch-side commands (train, export) are imported
only when run, so the runtime commands work on a host without the training stack."""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from fromage.runtime.errors import FromageError, ParameterError
from fromage.runtime.sources import TUXPAINT_ROOT

from .options import add_engine_argument, add_kv_cache_argument


class _PartAction(argparse.Action):
    """--text and --image append to one ordered list, so images and text interleave."""

    def __call__(self, parser, namespace, value, option_string=None):
        parts = getattr(namespace, "parts", None) or []
        parts.append((self.const, value))
        namespace.parts = parts


def _add_backbone_args(p, defaults: bool = True):
    """Backbone flags; without defaults (train), unset flags fall back to the preset's values."""
    d = (lambda v: v) if defaults else (lambda v: None)
    p.add_argument("--lm", default=d("default"), help="Hugging Face causal-LM folder, or 'default' (SmolLM2-135M-Instruct)")
    p.add_argument("--encoder", default=d("efficientnet-lite0"),
                   help="'efficientnet-lite0' (default) or 'clip:<folder of a CLIP vision tower>'")
    p.add_argument("--k", type=int, default=d(1), help="visual tokens per image (default 1)")
    p.add_argument("--retrieval-dim", type=int, default=d(256))


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="fromage", description="Grounded LM runtime (FROMAGe): "
                                 "interleaved images and text in, text with retrieved images out.")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="learn [RET], W_c, W_t, W_i on image-caption pairs")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--preset", choices=["tuxpaint", "openclipart"], help="a documented recipe (data + "
                     "settings; training/default/MODEL_CARD.md): `tuxpaint` reproduces the shipped default "
                     "checkpoint's retrieval pieces, `openclipart` the recipe tried with clip art added")
    src.add_argument("--data", help="TSV with header 'caption<TAB>image'")
    src.add_argument("--tuxpaint", nargs="?", const=TUXPAINT_ROOT, metavar="ROOT",
                     help="the TuxPaint stamps (training split; the held-out split is evaluated)")
    p.add_argument("--image-dir", help="folder the TSV's image paths are relative to")
    p.add_argument("--extra", action="append", choices=["openclipart"],
                   help="more training data: the openclipart-png clip art (captions cleaned from file names)")
    _add_backbone_args(p, defaults=False)
    p.add_argument("--query-template", help="how text queries are written before [RET], '{}' = the text "
                   "(default '{}': as they are; trained on both layouts otherwise)")
    p.add_argument("--ret-init", help="a word whose embedding initialises [RET] (default: random)")
    p.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    for flag, kind, hint in (("--steps", int, "1000"), ("--batch-size", int, "32"), ("--caption-batch-size", int,
                             "= batch size"), ("--lr", float, "3e-4"), ("--warmup", int, "100"),
                             ("--save-every", int, "200"), ("--eval-every", int, "0: off"), ("--seed", int, "0")):
        p.add_argument(flag, type=kind, help=f"default {hint} (or the preset's)")
    p.add_argument("--threads", type=int)

    p = sub.add_parser("train-naming", help="fit W_c in closed form so that the model names what it sees "
                       "(the default model's second step, after `fromage train --preset tuxpaint`)")
    p.add_argument("--out", required=True, help="checkpoint folder to write")
    p.add_argument("--base", help="checkpoint whose retrieval pieces are kept (default: the default model's)")
    p.add_argument("--tuxpaint", default=TUXPAINT_ROOT, help="the TuxPaint stamps (their training split)")
    p.add_argument("--ridge", type=float, help="the ridge penalty (default: the default model's)")
    p.add_argument("--template", help="the visual tokens' sentence, '{}' = the object word (default: the default model's)")
    p.add_argument("--all-training", action="store_true",
                   help="fit on the whole training split (default: leave the validation split out and report on it)")
    p.add_argument("--threads", type=int)

    p = sub.add_parser("export", help="compile a checkpoint (or the default model) into a bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--default", action="store_true", help="the embedded default model")
    src.add_argument("--checkpoint", help="a checkpoint folder written by `fromage train`")
    src.add_argument("--fresh", action="store_true", help="backbones given by --lm/--encoder, untrained heads")
    _add_backbone_args(p)
    p.add_argument("--out", required=True, help="bundle folder to write")
    p.add_argument("--quantize", choices=["int4", "int8"],
                   help="decoder weights as 4/8-bit blocks (MatMulNBits); Q4_1/Q8_0 grids of a GGUF-born LM "
                        "are reused exactly (Llama-family LMs only)")
    p.add_argument("--activations", choices=["int8", "fp32"], default="int8",
                   help="with --quantize, for the ONNX Runtime engine: int8 (fast; outputs drift a little from "
                        "fp32) or fp32 (the fp32 bundle's outputs to ~1e-4, slower). The native engine always "
                        "rounds activations to 16 bits (fp32's outputs, fast)")
    p.add_argument("--overwrite", action="store_true")

    p = sub.add_parser("generate", help="generate text (and retrieved images) from interleaved input")
    p.add_argument("--bundle", required=True)
    p.add_argument("--index", help="image index built by `fromage index build`; without one, [RET] is never chosen")
    p.add_argument("--text", "-t", action=_PartAction, const="text", help="a text part (repeatable, in order)")
    p.add_argument("--image", "-i", action=_PartAction, const="image", help="an image part (repeatable, in order)")
    p.add_argument("prompt", nargs="?", help="text appended after the --text/--image parts")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop-id", type=int, action="append", help="stop token id (default: the model's EOS)")
    p.add_argument("--min-word-tokens", type=int, default=0, help="[RET] is banned for the first N tokens")
    p.add_argument("--ret-scale-factor", type=float, default=1.0)
    p.add_argument("--no-retrieval", action="store_true", help="never emit [RET]")
    p.add_argument("--top-images", type=int, default=1, help="images per [RET]")
    p.add_argument("--max-rets", type=int, default=0, help="[RET]s allowed per generation, then banned (0 = no limit)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution provider)")
    add_engine_argument(p)
    add_kv_cache_argument(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")

    p = sub.add_parser("index", help="image indexes for retrieval")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed images (a folder or a TSV) into an index")
    b.add_argument("source", help="folder of images (captions from X.txt next to X.png) or a TSV")
    b.add_argument("--bundle", required=True)
    b.add_argument("--out", required=True, help="index folder: new, empty, or holding a fromage index")
    b.add_argument("--image-dir", help="folder the TSV's image paths are relative to (default: the TSV's)")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--overwrite", action="store_true",
                   help="replace the index in --out (built beside it, swapped in when complete)")
    b.add_argument("--threads", type=int)
    c = isub.add_parser("check", help="check that every image of an index is found by its own embedding "
                        "(and that the vectors are intact); --repair fixes what the search graph misses")
    c.add_argument("index", metavar="INDEX", help="index folder")
    c.add_argument("--json", action="store_true", help="print the report as one JSON object")
    c.add_argument("--repair", action="store_true",
                   help="search the images the graph cannot reach exactly from now on (rewrites index.json)")

    p = sub.add_parser("bench", help="benchmark decoding (TTFT, tok/s, roofline, peers) and retrieval")
    from .bench import add_arguments as _bench_arguments
    _bench_arguments(p)
    p = sub.add_parser("bench-serve", prog="fromage bench serve", help="(also `fromage bench serve`) a server under "
                       "concurrent load against llama.cpp's llama-server: throughput, TTFT, TPOT, ITL, latency")
    from .bench_serve import add_arguments as _bench_serve_arguments
    _bench_serve_arguments(p)
    p = sub.add_parser("demo", help="first run: the default model answers a scripted interleaved session "
                       "(builds the bundle and a TuxPaint index if missing); writes demo.html + demo.json")
    from .demo import add_arguments as _demo_arguments
    _demo_arguments(p)
    _add_eval_parsers(sub)
    _add_serve_parser(sub)
    return ap


def _add_serve_parser(sub) -> None:
    p = sub.add_parser("serve", help="an OpenAI-compatible HTTP server with continuous batching, streaming and a chat page")
    p.add_argument("--bundle", required=True)
    p.add_argument("--index", help="image index for [RET] retrieval (without one, [RET] is never chosen)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("FROMAGE_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1/* (default: $FROMAGE_API_KEY; none: open)")
    p.add_argument("--max-batch", type=int, default=16, help="requests decoded together (default 16)")
    p.add_argument("--max-queue", type=int, default=64, help="requests waiting for a slot; beyond, 429 (default 64)")
    p.add_argument("--prefill-rows", type=int,
                   help="prompt positions fed per step while a full batch decodes (default 4; with free slots, "
                        "as many as they are, if more); fewer: lower "
                        "inter-token latency, later first tokens")
    p.add_argument("--prefix-cache-mb", type=float, default=256,
                   help="memory for recent prompts' KV caches, so a prompt that starts as one of them (a chat's "
                        "history, a shared system prompt) is fed from where they part (default 256; 0: off)")
    p.add_argument("--allowed-media-dir", help="file:// image URLs are allowed below this directory (default: none)")
    p.add_argument("--max-body-mb", type=float, default=100, help="largest request body (default 100 MB)")
    p.add_argument("--max-prompt-tokens", type=int, help="prompt positions per request (default: the model's context)")
    p.add_argument("--max-tokens", type=int, help="output tokens per request (default: what the context leaves)")
    p.add_argument("--model-name", help="the model id the API reports (default: the bundle folder's name)")
    p.add_argument("--device", default="cpu")
    add_engine_argument(p)
    add_kv_cache_argument(p)
    p.add_argument("--threads", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")


def _add_eval_parsers(sub) -> None:
    """`fromage eval` (held-out recall, perplexity, captions; `eval vist|visdial`) and `fromage retrieve`."""
    def common(p, leaf=False):  # on the leaves: given there or before the benchmark name, both work
        kw = {"default": argparse.SUPPRESS} if leaf else {}
        p.add_argument("--json", action="store_true", help="print JSON instead of a table", **kw)
        p.add_argument("--threads", type=int, **kw)
        p.add_argument("--device", help="cpu, cuda or tensorrt", **(kw or {"default": "cpu"}))
        add_engine_argument(p, **kw)
        p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files", **kw)

    p = sub.add_parser("eval", help="retrieval recall (vs random and a MiniLM baseline), caption perplexity and "
                       "captions on held-out images; `eval vist` / `eval visdial`: the paper's benchmarks")
    p.add_argument("--bundle", help="bundle to evaluate (required)")
    p.add_argument("--tuxpaint", default=TUXPAINT_ROOT, metavar="ROOT", help="TuxPaint stamps folder")
    p.add_argument("--data", metavar="TSV", help="evaluate on a TSV ('caption<TAB>image') instead of TuxPaint")
    p.add_argument("--image-dir", help="folder the TSV's image paths are relative to (also the split's root)")
    p.add_argument("--heldout-percent", type=int, default=15, help="held-out share of the deterministic split")
    p.add_argument("--no-baseline", action="store_true", help="skip the sentence-encoder baseline (needs torch)")
    p.add_argument("--captions", type=int, default=5, help="greedy captions of N held-out images")
    common(p)
    bench = p.add_subparsers(dest="benchmark", metavar="{vist,visdial,quantized}")
    v = bench.add_parser("vist", help="Visual Storytelling: retrieve each story's last image from its context")
    v.add_argument("--bundle", required=True)
    v.add_argument("--sis", required=True, help="story-in-sequence JSON (e.g. val.story-in-sequence.json)")
    v.add_argument("--images", required=True, help="folder of <photo_flickr_id>.jpg|png")
    v.add_argument("--candidates", choices=["last", "all"], default="last",
                   help="candidate images: the stories' last images (default) or all story images")
    v.add_argument("--limit", type=int, help="only the first N stories")
    common(v, leaf=True)
    d = bench.add_parser("visdial", help="Visual Dialog v1.0: text->image retrieval and answer ranking")
    d.add_argument("--bundle", required=True)
    d.add_argument("--dialogs", required=True, help="visdial_1.0_val.json")
    d.add_argument("--images", required=True, help="folder of VisualDialog_val2018_<12-digit id>.jpg or <id>.jpg")
    d.add_argument("--dense", help="visdial_1.0_val_dense_annotations.json (for NDCG)")
    d.add_argument("--rounds", choices=["last", "dense", "all"], default="last",
                   help="rounds whose answer options are ranked (all: the reference's protocol, 10x the cost)")
    d.add_argument("--limit", type=int, help="only the first N dialogs")
    d.add_argument("--no-t2i", action="store_true", help="skip text->image retrieval")
    d.add_argument("--no-it2t", action="store_true", help="skip answer ranking")
    common(d, leaf=True)
    q = bench.add_parser("quantized", help="a quantized bundle (or an f16 KV cache) against the fp32 bundle: "
                         "greedy agreement on held-out prompts and held-out perplexity")
    q.add_argument("--bundle", required=True, help="the quantized bundle (or the fp32 one, with --kv-cache f16)")
    q.add_argument("--reference", required=True, help="the fp32 bundle of the same model (run with an f32 KV cache)")
    add_kv_cache_argument(q)
    q.add_argument("--tuxpaint", default=TUXPAINT_ROOT, metavar="ROOT", help="TuxPaint stamps folder")
    q.add_argument("--prompts", type=int, default=10, help="held-out prompts (default 10)")
    q.add_argument("--tokens", type=int, default=32, help="greedy tokens per prompt (default 32)")
    common(q, leaf=True)

    r = sub.add_parser("retrieve", help="rank the images of an index for text queries ([RET] embedding)")
    r.add_argument("queries", nargs="*", metavar="QUERY")
    r.add_argument("--queries", dest="queries_file", metavar="FILE", help="one query per line")
    r.add_argument("--bundle", required=True)
    r.add_argument("--index", required=True)
    r.add_argument("--top-k", type=int, default=5)
    common(r)


def _cmd_retrieve(args) -> None:
    from fromage.runtime.generate import Fromage
    from fromage.runtime.scoring import ret_embeddings
    queries = list(args.queries)
    if args.queries_file:
        try:
            with open(args.queries_file, encoding="utf-8") as f:
                queries += [line.strip() for line in f if line.strip()]
        except OSError as e:
            raise FromageError(f"cannot read --queries file: {e}") from None
        except UnicodeDecodeError as e:
            raise FromageError(f"--queries file {args.queries_file} is not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not queries:
        raise FromageError("give at least one query (QUERY arguments or --queries FILE)")
    if args.top_k < 1:
        raise FromageError("--top-k must be at least 1")
    model = Fromage(args.bundle, index=args.index, device=args.device, threads=args.threads,
                    verify=not args.no_verify, engine=args.engine)
    for query, hits in zip(queries, model.index.search_batch(ret_embeddings(model, queries), args.top_k)):
        if args.json:
            results = [{"path": h.path, "score": h.score, "caption": h.caption} for h in hits]
            print(json.dumps({"query": query, "results": results}, ensure_ascii=False), flush=True)
        else:
            print(query)
            for rank, h in enumerate(hits, 1):
                print(f"  {rank:2d}. {h.score:.3f}  {h.path}" + (f"  ({h.caption})" if h.caption else ""))


def _cmd_generate(args) -> None:
    from fromage.runtime.generate import Fromage, ImageEvent, Result, TextEvent
    from fromage.runtime.prompt import ImagePart
    from fromage.runtime.sampling import SamplingParams
    parts = [ImagePart(v) if kind == "image" else v for kind, v in (getattr(args, "parts", None) or [])]
    if args.prompt:
        parts.append(args.prompt)
    if not parts:
        raise FromageError("give a prompt: text, and/or --image PATH / --text TEXT parts")
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_ids=args.stop_id,
                            min_word_tokens=args.min_word_tokens, ret_scale_factor=args.ret_scale_factor,
                            retrieval=not args.no_retrieval, top_images=args.top_images, max_rets=args.max_rets)
    model = Fromage(args.bundle, index=args.index, device=args.device, threads=args.threads,
                    verify=not args.no_verify, engine=args.engine, kv_cache=args.kv_cache)
    if args.json:
        print(json.dumps(model.generate(parts, params).to_json(), ensure_ascii=False))
        return
    result, noted = Result(), False
    for event in model.stream(parts, params, result):
        if not noted and result.token_budget < params.max_new_tokens:
            print(f"fromage: note: the context leaves room for {result.token_budget} new tokens "
                  f"(--max-new-tokens {params.max_new_tokens})", file=sys.stderr)
        noted = True
        if isinstance(event, TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageEvent):
            shown = ", ".join(f"{h.path} ({h.score:.3f})" for h in event.hits)
            print(f"\n[image: {shown}]", flush=True)
    print()


def _cmd_index(args) -> None:
    {"build": _cmd_index_build, "check": _cmd_index_check}[args.index_command](args)


def _cmd_index_check(args) -> None:
    from fromage.runtime.index_build import check_index
    report = check_index(args.index, repair=args.repair, progress=not args.json)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        keys = lambda ks: ", ".join(map(str, ks[:10])) + (", ..." if len(ks) > 10 else "")  # noqa: E731
        print(f"{report['index']}: {report['images']} images, queries search "
              + ("exactly" if report["search"] == "exact" else "the HNSW graph")
              + f" (exact up to {report['exact_search_max']} images)")
        print(f"  vectors: sha256 {report['vectors_sha256']}; "
              + (f"NOT FINITE: keys {keys(report['nonfinite_keys'])}" if report["nonfinite_keys"] else "all finite"))
        print(f"  search graph: {report['found_rank1']} found at rank 1 by their own vector, {report['found_tied']} "
              f"among tied scores (identical images), {report['graph_unreachable']} unreachable"
              + (f" (keys {keys(report['graph_unreachable_keys'])})" if report["graph_unreachable"] else ""))
        print(f"  searched exactly beside the graph: {report['searched_exactly_beside_graph']} keys"
              + (" (recorded now: --repair)" if report["repaired"] else ""))
        if report.get("damage"):
            print(f"  DAMAGED: {report['damage']}; {report['advice']}")
        elif report["missing"]:
            print(f"  {report['missing']} images no query can find (keys {keys(report['missing_keys'])})"
                  + ("" if report["search"] == "exact" else "; run `fromage index check --repair`"))
        print("ok: every image is found by its own embedding" if report["ok"] else "NOT OK")
    if not report["ok"]:
        raise SystemExit(1)


def _cmd_index_build(args) -> None:
    from fromage.runtime.bundle_reader import load_bundle
    from fromage.runtime.index_build import index_images
    index = index_images(load_bundle(args.bundle), args.source, args.out, image_dir=args.image_dir,
                         batch_size=args.batch_size, overwrite=args.overwrite, threads=args.threads)
    print(f"index of {index.count} images written to {args.out}")
    index.close()


# command -> (module, function), imported only when run: train and export need the training stack
COMMANDS = {
    "generate": ("fromage.tools.cli", "_cmd_generate"), "index": ("fromage.tools.cli", "_cmd_index"),
    "retrieve": ("fromage.tools.cli", "_cmd_retrieve"), "eval": ("fromage.tools.evaluate", "cmd_eval"),
    "bench": ("fromage.tools.bench", "cmd_bench"), "demo": ("fromage.tools.demo", "cmd_demo"),
    "bench-serve": ("fromage.tools.bench_serve", "cmd"),
    "train": ("fromage.training.cli", "cmd_train"), "train-naming": ("fromage.training.naming", "cmd_naming"),
    "export": ("fromage.export.cli", "cmd_export"),
    "serve": ("fromage.serve.server", "cmd_serve"),
}


# how the CLI spells the Python API's parameters where it differs from --name-with-dashes
_OPTION_NAMES = {"stop_ids": "--stop-id", "retrieval": "--no-retrieval"}


def _option(param: str) -> str:
    return _OPTION_NAMES.get(param, "--" + param.replace("_", "-"))


def _check_text_arguments(args) -> None:
    """Arguments come in as the OS gave them (undecodable bytes as lone surrogates): refuse them here."""
    for name, value in vars(args).items():
        for v in value if isinstance(value, list) else [value]:
            text = v[1] if isinstance(v, tuple) else v
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError:
                    raise FromageError(f"--{name.replace('_', '-')}: {text.encode('utf-8', 'replace')[:60]!r}... "
                                       "is not valid UTF-8") from None


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:2] == ["bench", "serve"]:  # `fromage bench serve` is the bench-serve command
        argv[:2] = ["bench-serve"]
    args = build_parser().parse_args(argv)
    try:
        _check_text_arguments(args)
        module, name = COMMANDS[args.command]
        getattr(importlib.import_module(module), name)(args)
    except ParameterError as e:
        print(f"fromage: error: {_option(e.param)}: {e.message}", file=sys.stderr)
        return 2
    except FromageError as e:
        print(f"fromage: error: {e}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`fromage ... --json | head`): stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except ModuleNotFoundError as e:
        if e.name and e.name.split(".")[0] in ("torch", "transformers", "onnx", "onnxscript", "safetensors"):
            print(f"fromage: error: `fromage {args.command}` needs the training stack ({e.name} is missing): "
                  f"pip install 'fromage[train]'", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("\nfromage: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
