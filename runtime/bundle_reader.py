"""Load a bundle directory and refuse one whose files do not match its manifest."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .errors import FromageError
from .files import sha256_file
from .preprocess import Preprocessing

MANIFEST = "manifest.json"
BUNDLE_FORMAT = "fromage-bundle"



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

    @property
    def preprocessing(self) -> Preprocessing:
        return Preprocessing.from_dict(self.manifest["preprocessing"])

    def graph_path(self, name: str) -> Path:
        return self.directory / self.manifest["graphs"][name]["file"]

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
        manifest = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise FromageError(f"{directory} is not a bundle: {MANIFEST} is missing") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FromageError(f"{mpath} is damaged: {e}") from None
    if manifest.get("format") != BUNDLE_FORMAT or manifest.get("version") != 1:
        raise FromageError(f"{mpath}: not a version-1 {BUNDLE_FORMAT} manifest")
    for name, entry in manifest["files"].items():
        path = directory / name
        if Path(name).name != name:
            raise FromageError(f"{mpath}: file entry {name!r} is not a plain file name")
        if not path.is_file():
            raise FromageError(f"bundle file {name} is missing from {directory}")
        if path.stat().st_size != entry["bytes"]:
            raise FromageError(f"bundle file {name} does not match the manifest "
                               f"(size {path.stat().st_size}, expected {entry['bytes']}); re-export the bundle")
        if verify and sha256_file(path) != entry["sha256"]:
            raise FromageError(f"bundle file {name} does not match the manifest (sha256 differs); "
                               f"it was modified or damaged; re-export the bundle")
    return Bundle(directory, manifest)
