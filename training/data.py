"""Caption/image datasets for training: FROMAGe-style TSVs, the TuxPaint stamps, a deterministic
train/held-out split, SVG rendering, and an on-disk cache of frozen image-encoder features.

Torch-free on purpose: `fromage index build` (runtime side) reads TSVs with it."""

from __future__ import annotations

import hashlib
import io
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from fromage.runtime.errors import FromageError

TUXPAINT_ROOT = "/usr/share/tuxpaint/stamps"


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
            raise FromageError(msg + "; pass skip_missing=True to drop them")
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
            with open(os.path.join(dirpath, name), encoding="utf-8-sig", errors="replace") as f:
                first = f.readline()
            caption = " ".join(first.split())  # collapses odd/repeated whitespace, strips \r
            if caption:
                examples.append(Example(os.path.abspath(os.path.join(dirpath, image)), caption))
    return sorted(examples, key=lambda e: e.image)


def split_examples(examples, root, heldout_percent: int = 15):
    """Deterministic train/held-out split that needs no stored state.

    An example is held out iff int(md5(rel).hexdigest(), 16) % 100 < heldout_percent, where rel is
    its image path relative to `root` with '/' separators. So the split is the same on every
    machine and run, and an example stays on its side when others are added or removed.
    Returns (train, heldout), each in input order."""
    if not 0 <= heldout_percent <= 100:
        raise FromageError(f"heldout_percent must be between 0 and 100, got {heldout_percent}")
    train, heldout = [], []
    for ex in examples:
        rel = Path(os.path.relpath(ex.image, root)).as_posix()
        bucket = int(hashlib.md5(rel.encode("utf-8")).hexdigest(), 16) % 100
        (heldout if bucket < heldout_percent else train).append(ex)
    return train, heldout


def render_svg(path, size: int = 256):
    """Render an SVG to an RGBA PIL image whose longer side is `size` (aspect ratio kept)."""
    import cairosvg  # training-only dependency
    from PIL import Image

    def render(**kw):
        return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), **kw))).convert("RGBA")

    try:
        img = render(output_width=size)  # cairosvg scales the height to keep the aspect ratio
        if img.height > size:
            img = render(output_height=size)
    except Exception as e:  # cairosvg raises many types (XML, entities forbidden, cairo errors)
        raise FromageError(f"cannot render SVG {path}: {type(e).__name__}: {e}") from e
    return img


_HASHES: dict[tuple, str] = {}  # (abspath, mtime_ns, size) -> sha256; files are hashed once per process


def file_sha256(path) -> str:
    path = os.path.abspath(path)
    try:
        st = os.stat(path)
    except OSError as e:
        raise FromageError(f"image file not found: {path}") from e
    key = (path, st.st_mtime_ns, st.st_size)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _HASHES[key] = h.hexdigest()
    return _HASHES[key]


class FeatureCache:
    """Frozen-encoder image features cached on disk, so only the first epoch runs the encoder.

    Layout: cache_dir/<sha256(encoder_id)[:16]>/<sha[:2]>/<sha>.npy, where sha is the sha256 of the
    image file's bytes: renamed or duplicate files share an entry, and a changed encoder gets a
    fresh folder. Each file is written under a temporary name and moved into place with
    os.replace, so a killed run never leaves a half-written entry."""

    def __init__(self, cache_dir, encoder_id: str):
        self.encoder_id = encoder_id
        self.dir = Path(cache_dir) / hashlib.sha256(encoder_id.encode("utf-8")).hexdigest()[:16]
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "encoder_id.txt").write_text(encoder_id + "\n", encoding="utf-8")  # for humans

    def _file(self, sha: str) -> Path:
        return self.dir / sha[:2] / f"{sha}.npy"

    def _load(self, sha: str):
        try:
            return np.load(self._file(sha))
        except (OSError, ValueError, EOFError):
            return None  # absent or unreadable: recompute it

    def _store(self, sha: str, feat: np.ndarray) -> None:
        final = self._file(sha)
        final.parent.mkdir(exist_ok=True)
        tmp = final.with_name(f"{final.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:  # a file object, because np.save(str) would append ".npy"
            np.save(f, feat)
        os.replace(tmp, final)

    def get_many(self, paths: list[str], compute: Callable[[list[str]], np.ndarray],
                 batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Features for `paths` as an (n, D) float32 array, calling `compute(batch_paths)` -> (b, D)
        only on images whose content is not cached yet (each distinct content once)."""
        from tqdm import tqdm

        shas = [file_sha256(p) for p in paths]
        found = {}
        todo = {}  # sha -> one path with that content
        for p, sha in zip(paths, shas):
            if sha in found or sha in todo:
                continue
            feat = self._load(sha)
            if feat is None:
                todo[sha] = p
            else:
                found[sha] = feat
        items = list(todo.items())
        with tqdm(total=len(items), desc="caching image features", unit="img",
                  disable=not progress or not items) as bar:
            for i in range(0, len(items), batch_size):
                batch = items[i:i + batch_size]
                feats = np.asarray(compute([p for _, p in batch]), dtype=np.float32)
                if feats.ndim != 2 or feats.shape[0] != len(batch):
                    raise ValueError(f"compute returned shape {feats.shape} for {len(batch)} images")
                for (sha, _), feat in zip(batch, feats):
                    self._store(sha, feat)
                    found[sha] = feat
                bar.update(len(batch))
        if not paths:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([found[sha] for sha in shas]).astype(np.float32, copy=False)
