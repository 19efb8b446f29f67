"""`fromage serve`: options -> ServerConfig -> uvicorn."""
from __future__ import annotations

import os
import sys

from fromage.runtime.errors import FromageError

from .app import ServerConfig, create_app


def cmd_serve(args) -> None:
    # OpenMP's idle threads would spin between decoding steps on the cores that the HTTP side needs;
    # set before the native library loads
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import uvicorn
    if not 0 < args.port < 65536:
        raise FromageError(f"--port must be 1..65535, got {args.port}")
    if args.max_batch < 1 or args.max_queue < 0 or args.max_body_mb <= 0:
        raise FromageError("--max-batch must be >= 1, --max-queue >= 0 and --max-body-mb > 0")
    if args.allowed_media_dir and not os.path.isdir(args.allowed_media_dir):
        raise FromageError(f"--allowed-media-dir {args.allowed_media_dir} is not a directory")
    config = ServerConfig(bundle=args.bundle, index=args.index, engine=args.engine, device=args.device,
                          threads=args.threads, verify=not args.no_verify, max_batch=args.max_batch,
                          max_queue=args.max_queue, api_key=args.api_key, allowed_media_dir=args.allowed_media_dir,
                          max_body_bytes=int(args.max_body_mb * 1024 * 1024), model_name=args.model_name,
                          max_prompt_tokens=args.max_prompt_tokens, max_tokens=args.max_tokens)
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"fromage: warning: serving on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    uvicorn.run(create_app(config), host=args.host, port=args.port, log_level="info", access_log=False)
