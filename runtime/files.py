"""File helpers shared by every layer above the engines: a file's sha256 and atomic writes."""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Callable, Union

from .errors import FromageError

# (device, inode, mtime_ns, size) -> sha256: a file hashed once per process, found again after a rename (an
# index swapped into place); the oldest entries go beyond HASHES_KEPT (an index build hashes every image)
_HASHES: dict[tuple, str] = {}
HASHES_KEPT = 4096


def sha256_file(path, chunk: int = 1 << 22) -> str:
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FromageError(f"file not found: {path}") from e
    key = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        while len(_HASHES) >= HASHES_KEPT:
            del _HASHES[next(iter(_HASHES))]
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


def write_atomic(path, content: Union[str, bytes, Callable[[Path], None]]) -> Path:
    """Write `content` (text, bytes, or a function that writes the file at the path it is given) to a
    temp file beside `path`, then rename it into place: a killed write never leaves a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if callable(content):
            os.close(fd)
            content(Path(tmp))
        else:
            with os.fdopen(fd, "wb") as f:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
