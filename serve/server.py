"""`fromage serve`: options -> ServerConfig -> uvicorn."""
from __future__ import annotations

import os
import sys

from fromage.runtime.errors import FromageError
from fromage.runtime.generate import check_decoder_options

from .app import ServerConfig, create_app

SPIN_COUNT = 30_000  # libgomp spin iterations before an idle thread sleeps (its default: 300,000)
GIL_SWITCH_S = 0.0005  # how long a thread waiting for the GIL lets its holder run (Python's default: 0.005)


def cmd_serve(args) -> None:
    # OpenMP's idle threads spin for a while after each parallel region: long enough (libgomp's default)
    # and they take the cores the HTTP side needs between decoding steps; not at all, and every region
    # pays a wake-up. A short spin covers the gaps inside a step. Set before the native library loads.
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)
    import uvicorn
    # The scheduler's thread leaves each decoding step (ctypes, no GIL) needing the GIL back while the event
    # loop holds it for the streams' chunks: with Python's 5 ms switch interval both cores could idle that long.
    sys.setswitchinterval(GIL_SWITCH_S)
    if not 0 < args.port < 65536:
        raise FromageError(f"--port must be 1..65535, got {args.port}")
    below_one = [n for n in ("prefill_rows", "max_tokens", "max_prompt_tokens") if getattr(args, n) is not None
                 and getattr(args, n) < 1]
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body_mb <= 0 or args.prefix_cache_mb < 0 or below_one:
        raise FromageError("--max-batch, --prefill-rows, --max-tokens and --max-prompt-tokens must be >= 1, "
                           "--max-queue and --prefix-cache-mb >= 0 and --max-body-mb > 0")
    check_decoder_options(args.engine, args.kv_cache)  # said now, not by /health once the model fails to load
    if args.allowed_media_dir and not os.path.isdir(args.allowed_media_dir):
        raise FromageError(f"--allowed-media-dir {args.allowed_media_dir} is not a directory")
    config = ServerConfig(bundle=args.bundle, index=args.index, engine=args.engine, kv_cache=args.kv_cache,
                          device=args.device,
                          threads=args.threads, verify=not args.no_verify, max_batch=args.max_batch,
                          max_queue=args.max_queue, prefill_rows=args.prefill_rows, api_key=args.api_key,
                          prefix_cache_bytes=int(args.prefix_cache_mb * 1024 * 1024),
                          allowed_media_dir=args.allowed_media_dir,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024), model_name=args.model_name,
                          max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"fromage: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info", access_log=False)
