"""Load a bundle directory and refuse one whose files do not match its manifest."""
from __future__ import annotations

import functools
import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import FromageError
from .files import sha256_file
from .preprocess import Preprocessing

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "fromage-bundle"
TOKENIZER = "tokenizer.json"
GRAPHS = ("vision", "embed", "decoder")
MAX_MANIFEST_BYTES = 16 * 1024 * 1024



@dataclass
class Bundle:
    directory: Path
    manifest: dict

    @property
    def model(self) -> dict:
        return self.manifest["model"]

    @property
    def tokens(self) -> dict:
        return self.manifest["tokens"]

    @functools.cached_property  # parsed once, not for every image of every request
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    def graph_path(self, name: str) -> Path:
        """The graph's file: load_bundle checked that it lies inside the bundle and in the hash list."""
        graph = self.manifest["graphs"].get(name)
        if not isinstance(graph, dict):
            raise FromageError(f"the bundle {self.directory} has no {name!r} graph")
        return _contained(self.directory, graph.get("file"), f"graphs.{name}.file", self.manifest["files"])

    @property
    def tokenizer_path(self) -> Path:
        return _contained(self.directory, TOKENIZER, "the tokenizer", self.manifest["files"])

    @property
    def vision_fingerprint(self) -> str:
        """Identifies the image side (encoder + W_i): an index is only valid for this bundle's."""
        return self.manifest["files"][self.manifest["graphs"]["vision"]["file"]]["sha256"]


def load_bundle(directory, verify: bool = True) -> Bundle:
    directory = Path(directory)
    mpath = directory / MANIFEST
    if not directory.is_dir():
        raise FromageError(f"no bundle at {directory}; build one with `fromage export --default --out {directory}`")
    try:
        if mpath.stat().st_size > MAX_MANIFEST_BYTES or not mpath.is_file():
            raise FromageError(f"{mpath} is not a manifest (not a regular file of at most {MAX_MANIFEST_BYTES} bytes)")
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise FromageError(f"{directory} is not a bundle: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FromageError(f"{mpath} is damaged: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != 1:
        raise FromageError(f"{mpath}: not a version-1 {BUNDLE_FORMAT} manifest")
    files, graphs = manifest.get("files"), manifest.get("graphs")
    if not isinstance(files, dict) or not isinstance(graphs, dict) or not all(
            isinstance(e, dict) and isinstance(e.get("sha256"), str) and type(e.get("bytes")) is int
            for e in files.values()):
        raise FromageError(f"{mpath}: the manifest's files or graphs entry is damaged")
    # every file the runtime opens is named here, inside the folder and hashed (verify or not)
    for g in GRAPHS:
        if not isinstance(graphs.get(g), dict):
            raise FromageError(f"{mpath}: graphs.{g} is missing")
    named = {f"graphs.{g}.file": e.get("file") if isinstance(e, dict) else None for g, e in graphs.items()}
    named["the tokenizer"] = TOKENIZER
    for entry, name in named.items():
        _contained(directory, name, entry, files, mpath)
    for name, entry in files.items():
        path = _contained(directory, name, f"files[{name!r}]", files, mpath)
        try:
            st = os.stat(path)
        except OSError:
            raise FromageError(f"bundle file {name} is missing from {directory}") from None
        if not stat.S_ISREG(st.st_mode):
            raise FromageError(f"bundle file {name} in {directory} is not a regular file")
        if st.st_size != entry["bytes"]:
            raise FromageError(f"bundle file {name} does not match the manifest "
                               f"(size {st.st_size}, expected {entry['bytes']}); re-export the bundle")
        if verify and sha256_file(path) != entry["sha256"]:
            raise FromageError(f"bundle file {name} does not match the manifest (sha256 differs); "
                               f"it was modified or damaged; re-export the bundle")
    return Bundle(directory, manifest)


def _contained(directory: Path, name, entry: str, files: dict, mpath=None) -> Path:
    """The resolved path of a file the manifest names: a plain name listed in its hash list, which
    (links followed) stays inside the bundle folder. `--no-verify` skips hashing, never this."""
    where = f"{mpath or Path(directory) / MANIFEST}: {entry}"
    if not isinstance(name, str) or not name or name in (".", "..") or Path(name).name != name \
            or "\x00" in name or "\\" in name:
        raise FromageError(f"{where} ({name!r}) is not a plain file name inside the bundle")
    if name not in files:
        raise FromageError(f"{where} ({name!r}) is not in the manifest's file list (its hashes)")
    try:
        root = Path(directory).resolve()
        path = (Path(directory) / name).resolve()
    except (OSError, RuntimeError) as e:  # a loop of links
        raise FromageError(f"{where} ({name!r}) cannot be resolved: {e}") from None
    if root not in path.parents:
        raise FromageError(f"{where} ({name!r}) points outside the bundle folder (to {path})")
    return path
