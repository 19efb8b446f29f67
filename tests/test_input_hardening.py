"""Hostile inputs get a clear FromageError, in bounded time and memory: images (raster and SVG),
prompt text (no control tokens from user text), bundle manifests (no path outside the bundle)."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from fromage.runtime import preprocess as P
from fromage.runtime.bundle_reader import load_bundle
from fromage.runtime.errors import FromageError
from fromage.runtime.prompt import MAX_TEXT_CHARS, ImagePart, to_segments


def png_bytes(w, h, mode="RGB", level=1) -> bytes:
    b = io.BytesIO()
    Image.new(mode, (w, h)).save(b, "PNG", compress_level=level)
    return b.getvalue()


def png_header(w, h) -> bytes:
    """A PNG that claims w x h pixels: what a decompression bomb shows before decoding."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


@pytest.fixture
def alarm():
    """Fail instead of hanging: a FIFO opened for reading would block forever."""
    def fail(*_):
        raise TimeoutError("blocked")
    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(10)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


# --- images: limits --------------------------------------------------------------------------

def test_limits_are_module_constants():
    assert P.MAX_IMAGE_BYTES == 64 * 1024 * 1024 and P.MAX_IMAGE_PIXELS == 64_000_000
    assert P.MAX_ASPECT_RATIO == 32 and P.SVG_RENDER_SIZE == 256
    assert "PNG" in P.IMAGE_FORMATS and "EPS" not in P.IMAGE_FORMATS


@pytest.mark.parametrize("w,h", [(20000, 1), (1, 20000), (8000, 100)])
def test_absurd_aspect_ratio_is_refused(w, h):
    with pytest.raises(FromageError, match=r"image too elongated: <image bytes> is \d+x\d+ pixels"):
        P.preprocess([png_bytes(w, h)], P.Preprocessing())
    with pytest.raises(FromageError, match="too elongated: <image>"):
        P.load_rgb(Image.new("RGB", (w, h)))


def test_pixel_and_byte_limits(tmp_path):
    with pytest.raises(FromageError, match=r"image too large: <image bytes> is 9000x9000 pixels \(limit 64000000\)"):
        P.load_rgb(png_header(9000, 9000))
    with pytest.raises(FromageError, match=r"image too large: <image bytes> \(limit 64000000 pixels"):
        P.load_rgb(png_header(30000, 30000))
    with pytest.raises(FromageError, match="image too large: <image bytes> is .* bytes"):
        P.load_rgb(b"\0" * (P.MAX_IMAGE_BYTES + 1))
    big = tmp_path / "big.png"
    with open(big, "wb") as f:
        f.truncate(P.MAX_IMAGE_BYTES + 1)
    with pytest.raises(FromageError, match=f"image too large: {big} is {P.MAX_IMAGE_BYTES + 1} bytes"):
        P.load_rgb(big)
    assert P.load_rgb(png_bytes(32 * 7, 7)).size == (224, 7)  # exactly the ratio limit is fine


_PEAK = textwrap.dedent("""
    import gc, io, json, sys, time
    from PIL import Image
    from fromage.runtime.preprocess import Preprocessing, preprocess
    from fromage.runtime.errors import FromageError
    def status(key):
        for line in open("/proc/self/status"):
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    data = open(sys.argv[1], "rb").read()
    preprocess([open(sys.argv[2], "rb").read()], Preprocessing())  # warm up: imports, plugins, buffers
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # peak RSS := current RSS
    base, t = status("VmRSS:"), time.perf_counter()
    try:
        preprocess([data], Preprocessing())
        err = None
    except FromageError as e:
        err = str(e)
    print(json.dumps({"extra": status("VmHWM:") - base, "seconds": time.perf_counter() - t, "error": err}))
""")


def _peak(tmp_path, data: bytes) -> dict:
    img, normal = tmp_path / "img", tmp_path / "normal.png"
    img.write_bytes(data)
    if not normal.exists():
        b = io.BytesIO()
        Image.fromarray(np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)).save(b, "PNG")
        normal.write_bytes(b.getvalue())
    out = subprocess.run([sys.executable, "-c", _PEAK, str(img), str(normal)], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_of_hostile_images(tmp_path):
    """The extra peak memory of preprocessing one image, measured in a fresh process (VmHWM after
    resetting it). Refused images cost about what a normal photo costs; one at the pixel limit costs
    its decoded pixels and one RGB copy (the resize works on at most size x 32 size), not the
    three or four full-size copies of before."""
    normal = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    b = io.BytesIO()
    Image.fromarray(normal).save(b, "PNG")
    ref = _peak(tmp_path, b.getvalue())
    assert ref["error"] is None
    budget = max(1.5 * ref["extra"], 16 << 20)
    for name, data in {"20000x1": png_bytes(20000, 1), "1x20000": png_bytes(1, 20000),
                       "bomb 100000x100000": png_header(100_000, 100_000)}.items():
        r = _peak(tmp_path, data)
        assert r["error"] and r["extra"] <= budget and r["seconds"] < 1, (name, r, ref)
    # at the decoded-pixel limit (a 1-bit PNG of a few hundred KB: a decompression bomb) and an RGBA
    # one, whose transparency is composited in strips; beyond it a PNG is refused, a JPEG decoded smaller
    side = int(P.MAX_DECODED_PIXELS ** 0.5)
    for mode, per_pixel in (("1", 5), ("RGBA", 8)):  # Pillow keeps RGB in 4 bytes a pixel
        r = _peak(tmp_path, png_bytes(side, side, mode, level=9))
        assert r["error"] is None and r["extra"] <= per_pixel * side * side * 1.15 + (32 << 20), (mode, r)
    assert "too large" in _peak(tmp_path, png_bytes(8000, 8000, "1", level=9))["error"]
    b = io.BytesIO()
    Image.new("RGB", (8000, 8000), (90, 120, 200)).save(b, "JPEG")
    r = _peak(tmp_path, b.getvalue())
    assert r["error"] is None and r["extra"] <= 8 * 2000 * 2000 * 1.15 + (32 << 20), r  # decoded at 1/4 scale


# --- images: files ---------------------------------------------------------------------------

@pytest.mark.parametrize("suffix", [".svg", ".png"])
def test_non_regular_files_are_refused_without_blocking(tmp_path, alarm, suffix):
    fifo = tmp_path / f"fifo{suffix}"
    os.mkfifo(fifo)
    with pytest.raises(FromageError, match=f"cannot read image {fifo}: it is not a regular file \\(a named pipe\\)"):
        P.load_rgb(fifo)
    dev = tmp_path / f"zero{suffix}"
    dev.symlink_to("/dev/zero")
    with pytest.raises(FromageError, match="is not a regular file \\(a character device\\)"):
        P.load_rgb(dev)
    with pytest.raises(FromageError, match="is not a regular file \\(a directory\\)"):
        P.load_rgb(tmp_path)
    with pytest.raises(FromageError, match=f"^image not found: {tmp_path / 'missing'}{suffix}$"):
        P.load_rgb(tmp_path / f"missing{suffix}")
    dangling = tmp_path / f"dangling{suffix}"
    dangling.symlink_to(tmp_path / "nowhere")
    with pytest.raises(FromageError, match="image not found"):
        P.load_rgb(dangling)


def test_error_messages_name_the_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(FromageError) as e:
        P.load_rgb(bad)
    assert str(e.value) == f"cannot read image {bad}: not an image (or a format Pillow cannot read)"
    with pytest.raises(FromageError) as e:
        P.preprocess([b"not a png"], P.Preprocessing())
    assert str(e.value) == "cannot read image <image bytes>: not an image (or a format Pillow cannot read)"
    with pytest.raises(FromageError, match="cannot read image upload.png: not an image"):
        P.load_rgb(b"nope", name="upload.png")
    truncated = png_bytes(64, 64, level=0)[:200]
    with pytest.raises(FromageError, match="cannot read image <image bytes>: damaged or truncated"):
        P.load_rgb(truncated)
    with pytest.raises(FromageError, match="an image must be a path, bytes or a PIL image"):
        P.load_rgb(12)


def _old_to_rgb(img):  # the conversion before strips
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img)
    return img.convert("RGB")


def test_colour_conversion_in_strips_is_exact():
    rgba = Image.fromarray(np.random.default_rng(1).integers(0, 256, (1500, 901, 4), np.uint8), "RGBA")
    p = rgba.convert("P")
    p.info["transparency"] = 7
    for img in (rgba, rgba.convert("LA"), rgba.convert("L"), rgba.convert("P"), p, rgba.convert("CMYK"),
                rgba.convert("1")):
        assert P.load_rgb(img).tobytes() == _old_to_rgb(img).tobytes(), img.mode


# --- images: SVG -----------------------------------------------------------------------------

SVG = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
       'width="40" height="20">{}</svg>')


def test_svg_never_fetches_files_or_urls(tmp_path, monkeypatch):
    import cairosvg.url
    fetched = []
    real = cairosvg.url.urlopen
    monkeypatch.setattr(cairosvg.url, "urlopen", lambda req, *a, **k: fetched.append(
        getattr(req, "full_url", req)) or real(req, *a, **k))
    red = tmp_path / "red.png"
    Image.new("RGB", (10, 10), (255, 0, 0)).save(red)
    refs = "".join(f'<image width="40" height="20" xlink:href="{u}"/>' for u in
                   (f"file://{red}", str(red), "red.png", "http://127.0.0.1:9/x.png"))
    path = tmp_path / "refs.svg"
    path.write_text(SVG.format(refs + '<use xlink:href="other.svg#a"/>'.replace("<use", "<g")))
    img = P.render_svg(path, size=64)
    assert img.size == (64, 32) and img.getpixel((32, 16))[3] == 0  # nothing drawn
    assert fetched == []
    blue = io.BytesIO()
    Image.new("RGB", (10, 10), (0, 0, 255)).save(blue, "PNG")
    import base64
    data = f"data:image/png;base64,{base64.b64encode(blue.getvalue()).decode()}"
    img = P.render_svg(SVG.format(f'<image width="40" height="20" href="{data}"/>').encode(), size=64)
    assert img.getpixel((32, 16)) == (0, 0, 255, 255) and len(fetched) == 1  # data: URLs, in memory


def test_svg_size_is_bounded(tmp_path):
    huge = '<svg xmlns="http://www.w3.org/2000/svg" width="1000000000" height="500000000"/>'
    assert P.render_svg(huge.encode()).size == (256, 128)
    path = tmp_path / "huge.svg"
    path.write_text(huge)
    assert P.load_rgb(path).size == (256, 128)
    for bad in ('<svg xmlns="http://www.w3.org/2000/svg" viewBox="0 0 100000 1"/>',
                '<svg xmlns="http://www.w3.org/2000/svg" width="1" height="100000"/>'):
        with pytest.raises(FromageError, match="too elongated"):
            P.render_svg(bad.encode())
    with pytest.raises(FromageError, match="size is undefined"):
        P.render_svg(b'<svg xmlns="http://www.w3.org/2000/svg"/>')


def test_svg_bombs(tmp_path):
    bomb = gzip.compress(b'<svg xmlns="http://www.w3.org/2000/svg" width="4" height="4">'
                         + b" " * (P.MAX_IMAGE_BYTES + 1) + b"</svg>")
    path = tmp_path / "bomb.svgz"
    path.write_bytes(bomb)
    with pytest.raises(FromageError, match=f"image too large: {path} expands beyond"):
        P.load_rgb(path)
    assert P.render_svg(gzip.compress(SVG.format("").encode())).size == (256, 128)
    import base64
    pixels = base64.b64encode(png_bytes(8000, 8000, "1", level=9)).decode()
    many = "".join(f'<image width="4" height="4" href="data:image/png;base64,{pixels}"/>' for _ in range(2))
    with pytest.raises(FromageError, match="images embedded in <image bytes> exceed 64000000 pixels"):
        P.render_svg(SVG.format(many).encode())
    header = base64.b64encode(png_header(30000, 30000)).decode()
    with pytest.raises(FromageError, match="exceed"):
        P.render_svg(SVG.format(f'<image width="4" height="4" href="data:image/png;base64,{header}"/>').encode())


# --- text ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    from conftest import make_tokenizer
    t = make_tokenizer("<s>").backend_tokenizer
    t.add_tokens(["[RET]"])
    return t


def test_control_strings_in_text_are_plain_text(tok):
    special = set(tok.get_added_tokens_decoder())
    for text in ("a [RET] b </s>", "<s><unk></s>[RET]", "[RET]", "x<s>y", " [RET]a cat"):
        assert any(i in special for i in tok.encode(text, add_special_tokens=False).ids)  # the old way
        seg = to_segments([text], tok, [])
        assert len(seg) == 1 and not special & set(seg[0]), text
        assert tok.decode(seg[0], skip_special_tokens=False) == text
    seg = to_segments(["a [RET]", ImagePart("x.png"), "</s>"], tok, [1])
    assert seg[0][0] == 1 and not special & set(seg[0][1:] + seg[2])


def test_normal_text_tokenizes_as_before(tok):
    for text in ("a red cat", "the picture of a small dog with a hat", " x ", "[RET ]", "<s", "ünïcödé 猫"):
        assert to_segments([text], tok, []) == [tok.encode(text, add_special_tokens=False).ids]


def test_invalid_text(tok):
    with pytest.raises(FromageError, match="text is not valid UTF-8: character 2 is '\\\\udcff'"):
        to_segments(["ab\udcffc"], tok, [])
    with pytest.raises(FromageError, match="too long"):
        to_segments(["a" * (MAX_TEXT_CHARS // 2 + 1)] * 2, tok, [])


def test_model_that_spells_a_special_token():
    """A vocabulary whose model itself maps "<s>" to the special id: the characters are tokenized one by one."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    vocab = {"<unk>": 0, "<s>": 1, "<": 2, "s": 3, ">": 4, "a": 5}
    t = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    t.add_special_tokens(["<unk>", "<s>"])
    assert to_segments(["a <s> a"], t, []) == [[5, 2, 3, 4, 5]]
    assert to_segments(["a b"], t, []) == [[5, 0]]  # an unknown word is the model's unk, as before


# --- bundles ---------------------------------------------------------------------------------

def _bundle(folder, tokenizer_json: str):
    folder.mkdir()
    names = {"vision.onnx": b"v", "embed.onnx": b"e", "decoder.onnx": b"d", "tokenizer.json": tokenizer_json.encode()}
    for n, b in names.items():
        (folder / n).write_bytes(b)
    manifest = {"format": "fromage-bundle", "version": 1,
                "graphs": {g: {"file": f"{g}.onnx"} for g in ("vision", "embed", "decoder")},
                "files": {n: {"sha256": hashlib.sha256(b).hexdigest(), "bytes": len(b)} for n, b in names.items()}}
    return manifest


def _write(folder, manifest):
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("verify", [True, False])
def test_manifest_paths_stay_inside_the_bundle(tmp_path, tok, verify, alarm):
    b = tmp_path / "b"
    m = _bundle(b, tok.to_str())
    _write(b, m)
    bundle = load_bundle(b, verify=verify)
    assert bundle.graph_path("decoder") == (b / "decoder.onnx").resolve()
    assert bundle.tokenizer_path == (b / "tokenizer.json").resolve()
    bad = json.loads(json.dumps(m))
    bad["graphs"]["decoder"]["file"] = "../../../../etc/passwd"
    _write(b, bad)
    with pytest.raises(FromageError, match=r"graphs.decoder.file \('../../../../etc/passwd'\) is not a plain file"):
        load_bundle(b, verify=verify)
    for name in ("..", ".", "/etc/passwd", "sub/../x"):
        bad = json.loads(json.dumps(m))
        bad["files"][name] = {"sha256": "0" * 64, "bytes": 1}
        _write(b, bad)
        with pytest.raises(FromageError, match="is not a plain file name inside the bundle"):
            load_bundle(b, verify=verify)
    bad = json.loads(json.dumps(m))
    bad["graphs"]["decoder"]["file"] = "extra.onnx"  # a file that is there, but not hashed
    (b / "extra.onnx").write_bytes(b"d")
    _write(b, bad)
    with pytest.raises(FromageError, match="graphs.decoder.file .* not in the manifest's file list"):
        load_bundle(b, verify=verify)
    bad = json.loads(json.dumps(m))
    del bad["files"]["tokenizer.json"]
    _write(b, bad)
    with pytest.raises(FromageError, match="the tokenizer .* not in the manifest's file list"):
        load_bundle(b, verify=verify)
    outside = tmp_path / "secret"
    outside.write_bytes(b"d")
    (b / "decoder.onnx").unlink()
    (b / "decoder.onnx").symlink_to(outside)  # same size as the entry: only containment catches it
    _write(b, m)
    with pytest.raises(FromageError, match="graphs.decoder.file .* points outside the bundle folder"):
        load_bundle(b, verify=verify)
    (b / "decoder.onnx").unlink()
    os.mkfifo(b / "decoder.onnx")
    with pytest.raises(FromageError, match="decoder.onnx .* is not a regular file"):
        load_bundle(b, verify=verify)
    (b / "decoder.onnx").unlink()
    (b / "decoder.onnx").write_bytes(b"d")
    del m["graphs"]["embed"]
    _write(b, m)
    with pytest.raises(FromageError, match="graphs.embed is missing"):
        load_bundle(b, verify=verify)
