"""Image preprocessing in numpy/PIL, shared by training and the runtime.

Training computes its frozen image features through this very function, so the runtime
feeds the vision graph exactly what the encoder saw during training.

Limits: every image input (a path, bytes, a PIL image) is checked against these before the work they
bound, and refused with a FromageError that names the file ("<image bytes>" for bytes):

  MAX_IMAGE_BYTES   64 MiB   a file (or bytes) larger than this is refused before it is read; a
                             gzip-compressed SVG may not expand beyond it either
  MAX_IMAGE_PIXELS  64 M     width x height, read from the header before decoding (~8k x 8k); for an
                             SVG, the pixels of all the raster images it embeds, together
  MAX_DECODED_PIXELS 24 M    the pixels actually decoded: a JPEG is decoded at a reduced scale (1/2,
                             1/4, 1/8: its sides stay >= DECODE_SIDE), other formats must fit as they are
  MAX_ASPECT_RATIO  32       longer side / shorter side: preprocessing scales the shorter side to the
                             model's size, so this bounds the resized image (<= size x 32 size)
  SVG_RENDER_SIZE   256      an SVG is rendered with its longer side at this many pixels, whatever
                             size it asks for
  IMAGE_FORMATS              the raster formats decoded (Pillow's others, EPS with its Ghostscript
                             call among them, are refused)

A path must name a regular file (links are followed): a FIFO, a device or a directory is refused
before it is opened, and the file is read with a bounded read. SVGs are rendered from those bytes
(cairosvg never opens a path or fetches a URL: references to files or the network are drawn empty;
data: URLs only, within the pixel budget). With these bounds, the extra memory of one image is at
most about 8 bytes per pixel of the largest image decoded (the decoded image and its RGB copy,
4 bytes a pixel each in Pillow: ~190 MB at MAX_DECODED_PIXELS), and a refused one costs no more
than its file's bytes.
"""
from __future__ import annotations

import io
import math
import os
import stat
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import FromageError

class ImageTooLarge(FromageError):
    """An image over one of the size limits below (the server answers 413)."""


MAX_IMAGE_BYTES = 64 * 1024 * 1024
MAX_IMAGE_PIXELS = 64_000_000  # ~8k x 8k; larger files are refused before decoding
MAX_DECODED_PIXELS = 24_000_000
DECODE_SIDE = 1024  # a large JPEG is decoded at the smallest DCT scale that keeps both sides >= this
MAX_ASPECT_RATIO = 32
SVG_RENDER_SIZE = 256
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "GIF", "BMP", "DIB", "WEBP", "TIFF", "PPM", "ICO", "TGA")
SVG_SUFFIXES = (".svg", ".svgz")
BYTES_NAME = "<image bytes>"
_STRIP_PIXELS = 1 << 20  # colour conversion runs in strips of ~1M pixels: no second full-size copy


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
        try:
            pp = cls(size=int(d["size"]), resize=d["resize"], interpolation=d["interpolation"],
                     mean=tuple(float(x) for x in d["mean"]), std=tuple(float(x) for x in d["std"]))
        except (KeyError, TypeError, ValueError) as e:
            raise FromageError(f"the preprocessing entry is invalid: {type(e).__name__}: {e}") from None
        if not 1 <= pp.size <= 4096 or pp.resize != "shorter_side_center_crop" \
                or pp.interpolation not in _RESAMPLE or len(pp.mean) != 3 or len(pp.std) != 3 \
                or not all(math.isfinite(x) for x in pp.mean + pp.std) or 0.0 in pp.std:
            raise FromageError(f"the preprocessing entry is invalid: {d}")
        return pp


# ---- reading -------------------------------------------------------------------------------

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def _not_regular(path, mode: int) -> FromageError:
    kind = next((k for test, k in _KINDS if test(mode)), "not a plain file")
    return FromageError(f"cannot read image {path}: it is not a regular file ({kind})")


def _too_many_bytes(name, n) -> FromageError:
    return ImageTooLarge(f"image too large: {name} is {n} bytes (limit {MAX_IMAGE_BYTES})")


def read_image_file(path) -> bytes:
    """The bytes of an image file: a regular file (links followed) of at most MAX_IMAGE_BYTES. The type
    is checked before opening (a FIFO would block, a device never ends) and again on the open file."""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        raise FromageError(f"image not found: {path}") from None
    except (OSError, ValueError) as e:  # permissions, a loop of links, a NUL in the name
        raise FromageError(f"cannot read image {path}: {getattr(e, 'strerror', None) or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(path, st.st_mode)
    if st.st_size > MAX_IMAGE_BYTES:
        raise _too_many_bytes(path, st.st_size)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FromageError(f"image not found: {path}") from None
    except OSError as e:
        raise FromageError(f"cannot read image {path}: {e.strerror or e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())  # the file opened may not be the one checked (replaced meanwhile)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, st.st_mode)
        try:
            data = f.read(MAX_IMAGE_BYTES + 1)
        except OSError as e:
            raise FromageError(f"cannot read image {path}: {e.strerror or e}") from None
    if len(data) > MAX_IMAGE_BYTES:  # it grew after the check
        raise _too_many_bytes(path, f"more than {MAX_IMAGE_BYTES}")
    return data


def check_image_size(width: int, height: int, name) -> None:
    """Refuse an image whose pixels or aspect ratio exceed the limits (before it is decoded)."""
    if width < 1 or height < 1:
        raise FromageError(f"cannot read image {name}: it has no pixels ({width}x{height})")
    if width * height > MAX_IMAGE_PIXELS:
        raise ImageTooLarge(f"image too large: {name} is {width}x{height} pixels (limit {MAX_IMAGE_PIXELS})")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise FromageError(f"image too elongated: {name} is {width}x{height} pixels "
                           f"(aspect ratio over {MAX_ASPECT_RATIO}:1)")


def _open_formats() -> tuple:
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def decode_image(data: bytes, name=BYTES_NAME) -> Image.Image:
    """Encoded raster bytes -> a loaded PIL image, its size checked before decoding."""
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_many_bytes(name, len(data))
    try:
        img = Image.open(io.BytesIO(data), formats=_open_formats())
    except UnidentifiedImageError:
        raise FromageError(f"cannot read image {name}: not an image (or a format Pillow cannot read)") from None
    except Image.DecompressionBombError as e:  # Pillow's own check, at 2.8x MAX_IMAGE_PIXELS
        raise ImageTooLarge(f"image too large: {name} (limit {MAX_IMAGE_PIXELS} pixels; {e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:
        raise FromageError(f"cannot read image {name}: {e}") from None
    check_image_size(img.width, img.height, name)
    if img.format == "JPEG":
        img.draft("RGB", (DECODE_SIDE, DECODE_SIDE))  # the model sees a few hundred pixels: decode less
    if img.width * img.height > MAX_DECODED_PIXELS:
        raise ImageTooLarge(f"image too large: {name} is {img.width}x{img.height} pixels (limit {MAX_DECODED_PIXELS} "
                           f"pixels; JPEGs up to {MAX_IMAGE_PIXELS}, decoded at a reduced scale)")
    try:
        img.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError, MemoryError) as e:
        raise FromageError(f"cannot read image {name}: damaged or truncated ({e})") from None
    return img


def _to_rgb(img: Image.Image, name) -> Image.Image:
    """RGB; transparent pixels composited onto white. Converted in strips of rows (each conversion is
    per pixel, so the result is exactly that of converting the whole image): a large image costs its
    RGB copy, not two or three full-size intermediates."""
    if img.mode == "RGB":
        return img
    alpha = img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info)

    def rgb(part: Image.Image) -> Image.Image:
        if alpha:
            part = Image.alpha_composite(Image.new("RGBA", part.size, (255, 255, 255, 255)), part.convert("RGBA"))
        return part.convert("RGB")
    try:
        if img.width * img.height <= _STRIP_PIXELS:  # one strip: converted whole, no copy to paste from
            return rgb(img)
        out = Image.new("RGB", img.size)
        step = max(1, _STRIP_PIXELS // img.width)
        for top in range(0, img.height, step):
            out.paste(rgb(img.crop((0, top, img.width, min(img.height, top + step)))), (0, top))
    except (ValueError, OSError) as e:  # a mode without an RGB conversion
        raise FromageError(f"cannot read image {name}: {e}") from None
    return out


def load_rgb(source: str | Path | bytes | Image.Image, name=None) -> Image.Image:
    """Open an image as RGB; transparent pixels are composited onto white (TuxPaint PNGs are RGBA).
    `name` names a bytes or PIL source in errors (default "<image bytes>")."""
    if isinstance(source, Image.Image):
        name = name or "<image>"
        img = source
        check_image_size(img.width, img.height, name)
    elif isinstance(source, (bytes, bytearray, memoryview)):
        name = name or BYTES_NAME
        img = decode_image(bytes(source), name)
    elif isinstance(source, (str, os.PathLike)):
        name = name or str(source)
        data = read_image_file(source)
        if Path(source).suffix.lower() in SVG_SUFFIXES:
            img = render_svg(data, name=name)
        else:
            img = decode_image(data, name)
    else:
        raise FromageError(f"an image must be a path, bytes or a PIL image, not {type(source).__name__}")
    return _to_rgb(img, name)


# ---- SVG -----------------------------------------------------------------------------------

_EMPTY_SVG = b'<svg xmlns="http://www.w3.org/2000/svg" width="1" height="1"></svg>'
_GZIP = b"\x1f\x8b"


class _Size(Exception):
    def __init__(self, width, height):
        super().__init__(width, height)
        self.width, self.height = width, height


def _gunzip(data: bytes, name) -> bytes:
    d = zlib.decompressobj(wbits=31)
    try:
        out = d.decompress(data, MAX_IMAGE_BYTES + 1)
    except zlib.error as e:
        raise FromageError(f"cannot render SVG {name}: damaged gzip data ({e})") from None
    if len(out) > MAX_IMAGE_BYTES or d.unconsumed_tail:
        raise ImageTooLarge(f"image too large: {name} expands beyond {MAX_IMAGE_BYTES} bytes when decompressed")
    return out


def _svg_fetcher(name):
    """cairosvg's url_fetcher: only data: URLs are read (in memory); an embedded raster is size-checked
    and counts towards the SVG's pixel budget; anything else (files, http) is drawn empty, never fetched."""
    from cairosvg.url import fetch
    used = [0]

    def fetcher(url, resource_type):
        if not str(url).startswith("data:"):
            return _EMPTY_SVG
        data = fetch(url, resource_type)  # urllib decodes a data: URL in memory, no I/O
        if data.startswith(_GZIP):
            raise FromageError(f"an image embedded in {name} is gzip-compressed")
        if data.startswith((b"<svg ", b"<?xml", b"<!DOC")) or b"<svg" in data:
            return data
        if len(data) >= 5 and resource_type.startswith("image/"):
            try:
                img = Image.open(io.BytesIO(data), formats=_open_formats())
            except Image.DecompressionBombError:
                raise ImageTooLarge(f"image too large: the images embedded in {name} exceed "
                                   f"{MAX_IMAGE_PIXELS} pixels") from None
            except Exception:
                raise FromageError(f"an image embedded in {name} is not an image Pillow can read") from None
            used[0] += img.width * img.height
            if used[0] > MAX_IMAGE_PIXELS:
                raise ImageTooLarge(f"image too large: the images embedded in {name} exceed "
                                   f"{MAX_IMAGE_PIXELS} pixels")
        return data
    return fetcher


def render_svg(source, size: int = SVG_RENDER_SIZE, name=None) -> Image.Image:
    """Render an SVG (a path, or its bytes) to an RGBA PIL image whose longer side is `size` (aspect
    ratio kept), from memory: the file is read as any image file, cairosvg gets the bytes."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        data, name = bytes(source), name or BYTES_NAME
    else:
        data, name = read_image_file(source), name or str(source)
    try:
        import cairosvg.surface  # an optional extra: pip install 'fromage[svg]'
        from cairosvg.parser import Tree
    except ImportError:
        raise FromageError(f"rendering {name} needs cairosvg: pip install 'fromage[svg]'") from None
    if len(data) > MAX_IMAGE_BYTES:
        raise _too_many_bytes(name, len(data))
    if data.startswith(_GZIP):
        data = _gunzip(data, name)

    class Probe(cairosvg.surface.PNGSurface):  # its size, before any pixel is allocated
        def _create_surface(self, width, height):
            raise _Size(width, height)

    class Bounded(cairosvg.surface.PNGSurface):  # never a surface larger than size x size
        def _create_surface(self, width, height):
            if not (0 < round(width) <= size and 0 < round(height) <= size):
                raise FromageError(f"cannot render SVG {name}: a {width}x{height} surface exceeds {size}x{size}")
            return super()._create_surface(width, height)

    def render(tree, cls, **kw):
        out = io.BytesIO()
        cls(tree, out if cls is Bounded else None, 96, **kw).finish()
        return Image.open(io.BytesIO(out.getvalue())).convert("RGBA")

    def natural(tree, **kw):
        try:
            render(tree, Probe, **kw)
        except _Size as s:
            return float(s.width), float(s.height)
        raise FromageError(f"cannot render SVG {name}: its size is undefined")

    try:
        tree = Tree(bytestring=data, url_fetcher=_svg_fetcher(name), unsafe=False)
        w, h = natural(tree, output_width=size)  # cairosvg scales the height to keep the aspect ratio
        if not (math.isfinite(w) and math.isfinite(h) and w > 0 and h > 0):
            raise FromageError(f"cannot render SVG {name}: its size is undefined ({w}x{h})")
        if max(w, h) > MAX_ASPECT_RATIO * min(w, h):
            raise FromageError(f"image too elongated: {name} is {w:.4g}x{h:.4g} "
                               f"(aspect ratio over {MAX_ASPECT_RATIO}:1)")
        img = render(tree, Bounded, output_width=size) if round(h) <= size else \
            render(tree, Bounded, output_height=size)
    except FromageError:
        raise
    except Exception as e:  # cairosvg raises many types (XML, entities forbidden, cairo errors)
        raise FromageError(f"cannot render SVG {name}: {type(e).__name__}: {e}") from None
    return img


# ---- preprocessing -------------------------------------------------------------------------

_RESAMPLE = {"bicubic": Image.BICUBIC, "bilinear": Image.BILINEAR}


def preprocess(images: list, pp: Preprocessing) -> np.ndarray:
    """Images (paths, bytes or PIL) -> float32 array (n, 3, size, size), normalised. The aspect-ratio
    limit bounds the resized image: its longer side is at most MAX_ASPECT_RATIO x size."""
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
