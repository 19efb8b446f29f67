"""Image preprocessing in numpy/PIL, shared by training and the runtime.

Training computes its frozen image features through this very function, so the runtime
feeds the vision graph exactly what the encoder saw during training.
"""
from __future__ import annotations

import io
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FromageError

MAX_IMAGE_PIXELS = 64_000_000  # ~8k x 8k; larger files are refused before decoding
MAX_IMAGE_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class Preprocessing:
    """How pixels become the encoder's input; stored in the bundle manifest."""
    size: int = 224
    resize: str = "shorter_side_center_crop"  # the only mode: resize shorter side, centre crop
    interpolation: str = "bicubic"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Preprocessing":
        return cls(size=int(d["size"]), resize=d["resize"], interpolation=d["interpolation"],
                   mean=tuple(d["mean"]), std=tuple(d["std"]))


def load_rgb(source: str | Path | bytes | Image.Image) -> Image.Image:
    """Open an image as RGB; transparent pixels are composited onto white (TuxPaint PNGs are RGBA)."""
    if isinstance(source, Image.Image):
        img = source
    else:
        name = "<bytes>" if isinstance(source, bytes) else str(source)
        if isinstance(source, bytes):
            data = source
        else:
            path = Path(source)
            if path.suffix.lower() == ".svg":
                return load_rgb(render_svg(str(path)))
            if not path.is_file():
                raise FromageError(f"image not found: {path}")
            if path.stat().st_size > MAX_IMAGE_BYTES:
                raise FromageError(f"image too large: {path} ({path.stat().st_size} bytes > {MAX_IMAGE_BYTES})")
            data = path.read_bytes()
        try:
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise FromageError(f"image too large: {name} is {img.width}x{img.height} pixels "
                                   f"(limit {MAX_IMAGE_PIXELS})")
            img.load()
        except FromageError:
            raise
        except (UnidentifiedImageError, OSError, Image.DecompressionBombError, ValueError) as e:
            raise FromageError(f"cannot read image {name}: {e}") from None
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, img)
    return img.convert("RGB")


def render_svg(path, size: int = 256):
    """Render an SVG to an RGBA PIL image whose longer side is `size` (aspect ratio kept)."""
    try:
        import cairosvg  # an optional extra: pip install 'fromage[svg]'
    except ImportError:
        raise FromageError(f"rendering {path} needs cairosvg: pip install 'fromage[svg]'") from None

    def render(**kw):
        return Image.open(io.BytesIO(cairosvg.svg2png(url=str(path), **kw))).convert("RGBA")

    try:
        img = render(output_width=size)  # cairosvg scales the height to keep the aspect ratio
        if img.height > size:
            img = render(output_height=size)
    except Exception as e:  # cairosvg raises many types (XML, entities forbidden, cairo errors)
        raise FromageError(f"cannot render SVG {path}: {type(e).__name__}: {e}") from e
    return img


_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def preprocess(images: list, pp: Preprocessing) -> np.ndarray:
    """Images (paths, bytes or PIL) -> float32 array (n, 3, size, size), normalised."""
    out = np.empty((len(images), 3, pp.size, pp.size), dtype=np.float32)
    mean = np.asarray(pp.mean, np.float32)[:, None, None]
    std = np.asarray(pp.std, np.float32)[:, None, None]
    for i, src in enumerate(images):
        img = load_rgb(src)
        scale = pp.size / min(img.size)
        w, h = max(pp.size, round(img.width * scale)), max(pp.size, round(img.height * scale))
        img = img.resize((w, h), _RESAMPLE[pp.interpolation])
        left, top = (w - pp.size) // 2, (h - pp.size) // 2
        img = img.crop((left, top, left + pp.size, top + pp.size))
        arr = np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0
        out[i] = (arr - mean) / std
    return out
