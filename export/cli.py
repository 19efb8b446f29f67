"""`fromage export`: a checkpoint, the embedded default model or fresh heads -> a bundle."""
from __future__ import annotations

import time

from fromage.training.cli import config_from_args, default_model
from fromage.training.model import FromageModel

from .bundle_writer import write_bundle


def cmd_export(args) -> None:
    t0 = time.perf_counter()
    if args.checkpoint:
        model = FromageModel.from_checkpoint(args.checkpoint)
    elif args.default:
        model = default_model()
    else:
        model = FromageModel(config_from_args(args))
    write_bundle(model, args.out, overwrite=args.overwrite, quantize=args.quantize,
                 activations=args.activations)
    print(f"bundle written to {args.out} in {time.perf_counter() - t0:.1f} s")
