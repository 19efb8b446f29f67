"""The `fromage` command. Parsers live here; torch-side commands (train, export) are imported
only when run, so the runtime commands work on a host without the training stack."""
from __future__ import annotations

import argparse
import json
import os
import sys

from .errors import FromageError


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
    src.add_argument("--preset", choices=["tuxpaint"], help="a documented recipe (data + settings); "
                     "`tuxpaint` reproduces the shipped default checkpoint")
    src.add_argument("--data", help="TSV with header 'caption<TAB>image'")
    src.add_argument("--tuxpaint", nargs="?", const="/usr/share/tuxpaint/stamps", metavar="ROOT",
                     help="the TuxPaint stamps (training split; the held-out split is evaluated)")
    p.add_argument("--image-dir", help="folder the TSV's image paths are relative to")
    _add_backbone_args(p, defaults=False)
    p.add_argument("--out", required=True, help="checkpoint folder (resumed if it exists)")
    for flag, kind, hint in (("--steps", int, "1000"), ("--batch-size", int, "32"), ("--caption-batch-size", int,
                             "= batch size"), ("--lr", float, "3e-4"), ("--warmup", int, "100"),
                             ("--save-every", int, "200"), ("--eval-every", int, "0: off"), ("--seed", int, "0")):
        p.add_argument(flag, type=kind, help=f"default {hint} (or the preset's)")
    p.add_argument("--threads", type=int)

    p = sub.add_parser("export", help="compile a checkpoint (or the default model) into a bundle")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--default", action="store_true", help="the embedded default model")
    src.add_argument("--checkpoint", help="a checkpoint folder written by `fromage train`")
    src.add_argument("--fresh", action="store_true", help="backbones given by --lm/--encoder, untrained heads")
    _add_backbone_args(p)
    p.add_argument("--out", required=True, help="bundle folder to write")
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
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")
    p.add_argument("--device", default="cpu", help="cpu, cuda or tensorrt (ONNX Runtime execution provider)")
    p.add_argument("--threads", type=int)
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of the bundle files")

    p = sub.add_parser("index", help="image indexes for retrieval")
    isub = p.add_subparsers(dest="index_command", required=True)
    b = isub.add_parser("build", help="embed images (a folder or a TSV) into an index")
    b.add_argument("source", help="folder of images (captions from X.txt next to X.png) or a TSV")
    b.add_argument("--bundle", required=True)
    b.add_argument("--out", required=True)
    b.add_argument("--image-dir")
    b.add_argument("--batch-size", type=int, default=32)
    b.add_argument("--overwrite", action="store_true")
    b.add_argument("--threads", type=int)
    return ap


def _cmd_generate(args) -> None:
    from .generate import Fromage, ImageEvent, TextEvent
    from .prompt import ImagePart
    from .sampling import SamplingParams
    parts = [ImagePart(v) if kind == "image" else v for kind, v in (getattr(args, "parts", None) or [])]
    if args.prompt:
        parts.append(args.prompt)
    if not parts:
        raise FromageError("give a prompt: text, and/or --image PATH / --text TEXT parts")
    model = Fromage(args.bundle, index=args.index, device=args.device, threads=args.threads,
                    verify=not args.no_verify)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                            top_p=args.top_p, seed=args.seed, stop_ids=args.stop_id,
                            min_word_tokens=args.min_word_tokens, ret_scale_factor=args.ret_scale_factor,
                            retrieval=not args.no_retrieval, top_images=args.top_images)
    if args.json:
        print(json.dumps(model.generate(parts, params).to_json(), ensure_ascii=False))
        return
    for event in model.stream(parts, params):
        if isinstance(event, TextEvent):
            print(event.text, end="", flush=True)
        elif isinstance(event, ImageEvent):
            shown = ", ".join(f"{h.path} ({h.score:.3f})" for h in event.hits)
            print(f"\n[image: {shown}]", flush=True)
    print()


def _cmd_index_build(args) -> None:
    from fromage.engines.onnxruntime import create_engine
    from .bundle import load_bundle
    from .preprocess import preprocess
    from .retrieval import build_index
    from .sources import list_images
    bundle = load_bundle(args.bundle)
    vision = create_engine(bundle.graph_path("vision"), threads=args.threads)
    pp = bundle.preprocessing

    def embed(paths):
        return vision.run({"pixel_values": preprocess(paths, pp)}, ["image_embedding"])[0]
    items = list_images(args.source, args.image_dir)
    index = build_index(items, embed, args.out, dim=bundle.model["retrieval_dim"],
                        embedder=bundle.vision_fingerprint, batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"index of {index.count} images written to {args.out}")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "generate":
            _cmd_generate(args)
        elif args.command == "index":
            _cmd_index_build(args)
        else:
            from fromage.training import cli as training_cli  # needs the [train] extra
            getattr(training_cli, f"cmd_{args.command}")(args)
    except FromageError as e:
        print(f"fromage: error: {e}", file=sys.stderr)
        return 2
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
