"""`fromage train` and `fromage export`: the torch side of the CLI."""
from __future__ import annotations

import time

from fromage.runtime.errors import FromageError

from .model import FromageConfig, FromageModel


def _encoder_spec(text: str) -> dict:
    if text == "efficientnet-lite0":
        return {"type": "efficientnet-lite0"}
    if text.startswith("clip:"):
        return {"type": "clip", "path": text[len("clip:"):]}
    raise FromageError(f"unknown --encoder {text!r}: use efficientnet-lite0 or clip:<folder>")


def _config(args) -> FromageConfig:
    return FromageConfig(lm=args.lm, encoder=_encoder_spec(args.encoder), k=args.k,
                         retrieval_dim=args.retrieval_dim, seed=getattr(args, "seed", 0))


def _set_threads(n):
    if n:
        import torch
        torch.set_num_threads(n)


def cmd_train(args) -> None:
    from pathlib import Path
    from .data import read_tsv, read_tuxpaint, split_examples
    from .train import TrainConfig, train
    _set_threads(args.threads)
    if args.data:
        examples = read_tsv(args.data, args.image_dir)
    else:
        examples, heldout = split_examples(read_tuxpaint(args.tuxpaint), args.tuxpaint)
        print(f"TuxPaint: {len(examples)} training / {len(heldout)} held-out images")
    out = Path(args.out)
    model = FromageModel.from_checkpoint(out) if (out / "config.json").is_file() else FromageModel(_config(args))
    cfg = TrainConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, warmup=args.warmup,
                      save_every=args.save_every, seed=args.seed)
    losses = train(model, examples, cfg, out)
    print(f"checkpoint written to {out}: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))


def cmd_export(args) -> None:
    from fromage.export.bundle import write_bundle
    t0 = time.perf_counter()
    if args.checkpoint:
        model = FromageModel.from_checkpoint(args.checkpoint)
    elif args.default:
        model = FromageModel(FromageConfig())  # SmolLM2-135M + EfficientNet-Lite0, fresh heads
    else:
        model = FromageModel(_config(args))
    write_bundle(model, args.out, overwrite=args.overwrite)
    print(f"bundle written to {args.out} in {time.perf_counter() - t0:.1f} s")
