"""Where images come from for an index: a folder (recursively) or a FROMAGe-style TSV."""
from __future__ import annotations

import os
from pathlib import Path

from .errors import FromageError

TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"  # Debian's tuxpaint-stamps-default: the default data
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".svg"}


def _sidecar_caption(image: Path) -> str | None:
    """A caption in X.txt next to X.png (TuxPaint's layout): its first line."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():
        return None
    with open(txt, encoding="utf-8-sig", errors="replace") as f:
        return " ".join(f.readline().split()) or None


def list_images(source, image_dir=None) -> list[tuple[str, str | None]]:
    """-> sorted (path, caption) pairs. A folder yields every image under it (PNG preferred
    over an SVG of the same name); a .tsv file yields its rows."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".tsv", ".txt"):
        from fromage.training.data import read_tsv  # torch-free
        return [(e.image, e.caption) for e in read_tsv(source, image_dir)]
    if not source.is_dir():
        raise FromageError(f"{source} is neither a folder of images nor a .tsv file")
    found: dict[str, Path] = {}
    for dirpath, _, files in os.walk(source):
        for name in files:
            path = Path(dirpath) / name
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            stem = str(path.with_suffix(""))
            if stem not in found or found[stem].suffix.lower() == ".svg":
                found[stem] = path
    if not found:
        raise FromageError(f"no images ({', '.join(sorted(IMAGE_SUFFIXES))}) under {source}")
    return [(str(p.resolve()), _sidecar_caption(p)) for _, p in sorted(found.items())]
