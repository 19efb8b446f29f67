"""Training data beside what runtime/sources.py reads (TSVs, the TuxPaint stamps, the held-out split):
an on-disk cache of frozen image-encoder features, and the validation split carved from training."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import numpy as np


from fromage.runtime.files import sha256_file, write_atomic
from fromage.runtime.sources import split_examples


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
        buf = io.BytesIO()  # np.save to a path would append ".npy" to the temp name
        np.save(buf, feat)
        write_atomic(self._file(sha), buf.getvalue())

    def get_many(self, paths: list[str], compute: Callable[[list[str]], np.ndarray],
                 batch_size: int = 64, progress: bool = True) -> np.ndarray:
        """Features for `paths` as an (n, D) float32 array, calling `compute(batch_paths)` -> (b, D)
        only on images whose content is not cached yet (each distinct content once)."""
        from tqdm import tqdm

        shas = [sha256_file(p) for p in paths]
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


def validation_split(train: list, root, percent: int = 10) -> tuple[list, list]:
    """Carves a validation split out of a training split -> (train, validation): `split_examples` with its
    own salt, so recipes and checkpoints are chosen without looking at the held-out split."""
    return split_examples(train, root, percent, salt="validation:")
