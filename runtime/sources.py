"""Where images and captions come from: a folder (recursively), a FROMAGe-style TSV, the TuxPaint
stamps; and the deterministic train/held-out split that training and evaluation share."""
from __future__ import annotations

import hashlib
import os
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

from .errors import FromageError

TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"  # Debian's tuxpaint-stamps-default: the default data
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".gif", ".bmp", ".svg"}


def _sidecar_caption(image: Path) -> str | None:
    """A caption in X.txt next to X.png (TuxPaint's layout): its first line."""
    txt = image.with_suffix(".txt")
    if not txt.is_file():  # (False for a FIFO or a device: never opened)
        return None
    try:
        with open(txt, encoding="utf-8-sig", errors="replace") as f:
            return " ".join(f.readline(4096).split()) or None
    except OSError:  # an unreadable caption file costs the image its caption, not the build
        return None


def _absolute(path: Path) -> str:
    try:
        return str(path.resolve())
    except (OSError, RuntimeError):  # a symlink loop: the image fails (and is skipped) later, with its name
        return os.path.abspath(path)


def list_images(source, image_dir=None, skip_missing: bool = True) -> list[tuple[str, str | None]]:
    """-> sorted (path, caption) pairs. A folder yields every image under it (PNG preferred
    over an SVG of the same name); a .tsv file yields its rows (those whose image file is missing
    are skipped with a warning on stderr naming a few, or refused with skip_missing=False)."""
    source = Path(source)
    if source.is_file() and source.suffix.lower() in (".tsv", ".txt"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            examples = read_tsv(source, image_dir, skip_missing=skip_missing)
        for w in caught:
            print(f"fromage: warning: {w.message}", file=sys.stderr)
        return [(e.image, e.caption) for e in examples]
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
    return [(_absolute(p), _sidecar_caption(p)) for _, p in sorted(found.items())]


@dataclass(frozen=True)
class Example:
    image: str  # absolute path
    caption: str


def read_tsv(path, image_dir=None, skip_missing: bool = False) -> list[Example]:
    """Read a FROMAGe-style TSV: a header naming the `caption` and `image` columns (any order),
    then one example per line. Relative image paths are resolved against `image_dir`
    (default: the TSV's folder). Missing images raise, or are skipped with a warning."""
    path = Path(path)
    if not path.is_file():
        raise FromageError(f"TSV file not found: {path}")
    base = Path(image_dir) if image_dir is not None else path.parent
    with open(path, encoding="utf-8-sig") as f:  # -sig: tolerate a BOM written by spreadsheet tools
        lines = f.read().splitlines()
    if not lines:
        raise FromageError(f"{path} is empty; expected a header line 'caption<TAB>image'")
    header = [h.strip() for h in lines[0].split("\t")]
    for col in ("caption", "image"):
        if col not in header:
            raise FromageError(f"{path}: header has no '{col}' column (found {header}); "
                               "expected a tab-separated header 'caption<TAB>image'")
    ci, ii = header.index("caption"), header.index("image")
    examples, missing = [], []
    for lineno, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue  # blank lines (e.g. a trailing one) carry no example
        fields = line.split("\t")
        if len(fields) != len(header):
            raise FromageError(f"{path}:{lineno}: expected {len(header)} tab-separated fields, "
                               f"found {len(fields)}")
        caption, image = fields[ci].strip(), fields[ii].strip()
        if not caption or not image:
            raise FromageError(f"{path}:{lineno}: empty caption or image field")
        full = os.path.abspath(os.path.join(base, image))  # join keeps absolute paths as they are
        if not os.path.isfile(full):
            missing.append(full)
            continue
        examples.append(Example(full, caption))
    if missing:
        msg = (f"{path}: {len(missing)} image file(s) not found (looked under {base}), e.g. "
               + ", ".join(missing[:5]))
        if not skip_missing:
            raise FromageError(msg + "; fix those rows, or give --image-dir DIR if the paths are relative to "
                               "another folder")
        warnings.warn(msg + "; skipping them", stacklevel=2)
    return examples


def read_tuxpaint(root=TUXPAINT_ROOT) -> list[Example]:
    """Stamps from the tuxpaint-stamps-default package: each X.png or X.svg with an X.txt whose
    first line is the English caption (later lines are `lang.utf8=...` translations).
    The symbols/ folder (letters, digits, coins) is skipped; PNG wins over SVG."""
    root = Path(root)
    if not root.is_dir():
        raise FromageError(f"TuxPaint stamps not found at {root}; install them with "
                           "`apt-get install tuxpaint-stamps-default` or pass another root")
    examples = []
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == root and "symbols" in dirnames:
            dirnames.remove("symbols")
        names = set(filenames)
        for name in filenames:
            stem, ext = os.path.splitext(name)
            if ext != ".txt":
                continue
            image = next((stem + e for e in (".png", ".svg") if stem + e in names), None)
            if image is None:
                continue  # a caption without a stamp image (happens in the real package)
            caption = _sidecar_caption(Path(dirpath) / image)
            if caption:
                examples.append(Example(os.path.abspath(os.path.join(dirpath, image)), caption))
    return sorted(examples, key=lambda e: e.image)


def split_examples(examples, root, heldout_percent: int = 15, salt: str = ""):
    """Deterministic train/held-out split that needs no stored state.

    An example is held out iff int(md5(salt + rel).hexdigest(), 16) % 100 < heldout_percent, where rel
    is its image path relative to `root` with '/' separators. So the split is the same on every
    machine and run, and an example stays on its side when others are added or removed; another
    salt cuts an independent split (training's validation split). Returns (train, heldout), each in
    input order."""
    if not 0 <= heldout_percent <= 100:
        raise FromageError(f"heldout_percent must be between 0 and 100, got {heldout_percent}")
    train, heldout = [], []
    for ex in examples:
        rel = Path(os.path.relpath(ex.image, root)).as_posix()
        bucket = int(hashlib.md5((salt + rel).encode("utf-8")).hexdigest(), 16) % 100
        (heldout if bucket < heldout_percent else train).append(ex)
    return train, heldout


def load_split(tuxpaint=TUXPAINT_ROOT, data=None, image_dir=None, heldout_percent: int = 15):
    """-> (train, heldout, description) from the TuxPaint stamps or a TSV, split deterministically
    by `split_examples` (md5 of the image path relative to the data root)."""
    if data is not None:
        examples = read_tsv(data, image_dir)
        root = Path(image_dir) if image_dir is not None else Path(data).parent
        source = f"TSV {data}"
    else:
        examples, root, source = read_tuxpaint(tuxpaint), Path(tuxpaint), f"TuxPaint stamps {tuxpaint}"
    train, heldout = split_examples(examples, root, heldout_percent)
    if len(heldout) < 2:
        raise FromageError(f"{source}: the held-out split has {len(heldout)} example(s) at {heldout_percent}% "
                           "held out; retrieval needs at least 2 (raise --heldout-percent)")
    return train, heldout, {"source": source, "train": len(train), "heldout": len(heldout),
                            "heldout_percent": heldout_percent}
