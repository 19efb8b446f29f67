"""Images in requests: base64 data: URLs, file:// URLs only below the directory the server was given
(--allowed-media-dir), and /v1/images/KEY for images the server itself retrieved (looked up by index
key, so no path from a request reaches the disk unchecked)."""
from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote, urlparse

from fromage.runtime.preprocess import MAX_IMAGE_BYTES
from fromage.runtime.prompt import ImagePart

from .errors import BadRequest

IMAGE_KEY_URL = re.compile(r"(?:https?://[^/]+)?/v1/images/(\d{1,18})")


@dataclass
class MediaPolicy:
    allowed_dir: Path | None = None   # file:// URLs below it (resolved); None: file:// refused
    index: object = None              # the served ImageIndex, for /v1/images/KEY


def image_part_from_url(url: str, media: MediaPolicy, where: str) -> ImagePart:
    if url.startswith("data:"):
        header, comma, data = url.partition(",")
        if not comma or not header.endswith(";base64"):
            raise BadRequest(f"{where}: only base64 data: URLs are supported (data:image/png;base64,...)", param="messages")
        if len(data) // 4 * 3 > MAX_IMAGE_BYTES:  # refused before decoding
            raise BadRequest(f"{where}: the image is larger than {MAX_IMAGE_BYTES} bytes", 413, "messages")
        try:
            return ImagePart(base64.b64decode(data, validate=True))
        except (binascii.Error, ValueError):
            raise BadRequest(f"{where}: the data: URL is not valid base64", param="messages") from None
    if url.startswith("file://"):
        if media.allowed_dir is None:
            raise BadRequest(f"{where}: file:// URLs are off (the server was not started with --allowed-media-dir)",
                             param="messages")
        path = Path(unquote(urlparse(url).path)).resolve()
        root = media.allowed_dir.resolve()
        if not path.is_relative_to(root):
            raise BadRequest(f"{where}: file:// URLs must point below the allowed media directory", param="messages")
        return ImagePart(str(path))  # preprocess refuses what is not a regular image file of bounded size
    m = IMAGE_KEY_URL.fullmatch(url)
    if m and media.index is not None:
        found = media.index.get(int(m.group(1)))
        if found is not None:
            return ImagePart(found[0])
    raise BadRequest(f"{where}: unsupported image URL (use a base64 data: URL, a file:// URL below the allowed "
                     "media directory, or /v1/images/KEY of a retrieved image)", param="messages")
