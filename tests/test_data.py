import os

import numpy as np
import pytest
from PIL import Image

from fromage.runtime.errors import FromageError
from fromage.training.data import FeatureCache
from fromage.runtime.sources import Example, read_tsv, read_tuxpaint, split_examples
from fromage.runtime.preprocess import render_svg

REAL_STAMPS = "/usr/share/tuxpaint/stamps"
SVG = ('<svg xmlns="http://www.w3.org/2000/svg" width="40" height="20">'
       '<rect width="40" height="20" fill="red"/></svg>')


def png(path, color=(255, 0, 0), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --- TSV ---------------------------------------------------------------------------------------

def test_tsv_round_trip(tmp_path):
    png(tmp_path / "imgs" / "a.png")
    png(tmp_path / "imgs" / "b.png", (0, 255, 0))
    tsv = write(tmp_path / "train.tsv", "caption\timage\na red square\timgs/a.png\n"
                                        "a green square\timgs/b.png\n\n")
    assert read_tsv(tsv) == [Example(str(tmp_path / "imgs" / "a.png"), "a red square"),
                             Example(str(tmp_path / "imgs" / "b.png"), "a green square")]


def test_tsv_swapped_header_image_dir_and_absolute_paths(tmp_path):
    a = png(tmp_path / "elsewhere" / "a.png")
    b = png(tmp_path / "abs" / "b.png")
    tsv = write(tmp_path / "t.tsv", f"image\tcaption\na.png\tcap a\n{b}\tcap b\n")
    got = read_tsv(tsv, image_dir=tmp_path / "elsewhere")
    assert got == [Example(str(a), "cap a"), Example(str(b), "cap b")]


def test_tsv_missing_column(tmp_path):
    tsv = write(tmp_path / "t.tsv", "text\timage\nhello\ta.png\n")
    with pytest.raises(FromageError, match="no 'caption' column"):
        read_tsv(tsv)


def test_tsv_bad_line_number(tmp_path):
    png(tmp_path / "a.png")
    tsv = write(tmp_path / "t.tsv", "caption\timage\nok\ta.png\nno tab here\n")
    with pytest.raises(FromageError, match=r"t\.tsv:3: expected 2 tab-separated fields"):
        read_tsv(tsv)


def test_tsv_missing_images(tmp_path):
    png(tmp_path / "ok.png")
    rows = "".join(f"cap {i}\tgone{i}.png\n" for i in range(7))
    tsv = write(tmp_path / "t.tsv", "caption\timage\nfine\tok.png\n" + rows)
    with pytest.raises(FromageError) as e:
        read_tsv(tsv)
    msg = str(e.value)
    assert "7 image file(s) not found" in msg and "gone0.png" in msg and "gone6.png" not in msg
    with pytest.warns(UserWarning, match="7 image file"):
        got = read_tsv(tsv, skip_missing=True)
    assert [x.caption for x in got] == ["fine"]


def test_tsv_file_missing(tmp_path):
    with pytest.raises(FromageError, match="not found"):
        read_tsv(tmp_path / "nope.tsv")


# --- TuxPaint ----------------------------------------------------------------------------------

def test_tuxpaint_fake_tree(tmp_path):
    root = tmp_path / "stamps"
    png(root / "animals" / "cat.png")
    write(root / "animals" / "cat.txt", "  A cat.  \r\nde.utf8=Eine Katze.\nfr.utf8=Un chat.\n")
    write(root / "food" / "apple.svg", SVG)
    write(root / "food" / "apple.txt", "An apple.\n")
    png(root / "food" / "both.png")
    write(root / "food" / "both.svg", SVG)
    write(root / "food" / "both.txt", "Both kinds.")
    png(root / "food" / "nocaption.png")             # no .txt: skipped
    write(root / "food" / "orphan.txt", "No image.")  # no image: skipped
    png(root / "food" / "empty.png")
    write(root / "food" / "empty.txt", "  \n")        # empty caption: skipped
    png(root / "symbols" / "a.png")
    write(root / "symbols" / "a.txt", "The letter A.")
    got = read_tuxpaint(root)
    assert got == [Example(str(root / "animals" / "cat.png"), "A cat."),
                   Example(str(root / "food" / "apple.svg"), "An apple."),
                   Example(str(root / "food" / "both.png"), "Both kinds.")]


def test_tuxpaint_missing_root(tmp_path):
    with pytest.raises(FromageError, match="apt-get install tuxpaint-stamps-default"):
        read_tuxpaint(tmp_path / "nothing")


@pytest.mark.skipif(not os.path.isdir(REAL_STAMPS), reason="tuxpaint-stamps-default not installed")
def test_tuxpaint_real():
    examples = read_tuxpaint(REAL_STAMPS)
    assert len(examples) > 500
    assert all(os.path.isfile(e.image) and e.caption for e in examples)
    assert not any("/symbols/" in e.image for e in examples)
    train, heldout = split_examples(examples, REAL_STAMPS)
    assert (train, heldout) == split_examples(list(examples), REAL_STAMPS)
    assert len(train) + len(heldout) == len(examples)
    assert 0.10 <= len(heldout) / len(examples) <= 0.20


# --- split -------------------------------------------------------------------------------------

def test_split_is_by_relative_path(tmp_path):
    exs = [Example(f"/data/a/img{i}.png", f"c{i}") for i in range(200)]
    moved = [Example(e.image.replace("/data/a", "/other/root"), e.caption) for e in exs]
    train, held = split_examples(exs, "/data/a")
    train2, held2 = split_examples(moved, "/other/root")
    assert [e.caption for e in held] == [e.caption for e in held2]
    assert split_examples(exs, "/data/a", 0) == (exs, [])
    assert split_examples(exs, "/data/a", 100) == ([], exs)
    with pytest.raises(FromageError):
        split_examples(exs, "/data/a", 101)


# --- SVG ---------------------------------------------------------------------------------------

def test_render_svg(tmp_path):
    img = render_svg(write(tmp_path / "r.svg", SVG), size=64)
    assert img.mode == "RGBA" and img.size == (64, 32)
    assert img.getpixel((32, 16)) == (255, 0, 0, 255)
    tall = SVG.replace('width="40" height="20"', 'width="20" height="40"')
    assert render_svg(write(tmp_path / "t.svg", tall), size=64).size == (32, 64)


def test_render_svg_failure(tmp_path):
    with pytest.raises(FromageError, match="cannot render SVG"):
        render_svg(write(tmp_path / "bad.svg", "<svg not closed"))
    entity = ('<?xml version="1.0"?><!DOCTYPE svg [<!ENTITY ns "http://www.w3.org/2000/svg">]>'
              '<svg xmlns="&ns;" width="4" height="4"/>')
    with pytest.raises(FromageError, match="cannot render SVG"):
        render_svg(write(tmp_path / "entity.svg", entity))


# --- FeatureCache ------------------------------------------------------------------------------

class Encoder:
    """Fake encoder: feature = mean colour of the image, records which paths it saw."""

    def __init__(self):
        self.seen = []

    def __call__(self, paths):
        self.seen.extend(paths)
        return np.stack([np.asarray(Image.open(p), dtype=np.float64).mean(axis=(0, 1))
                         for p in paths])


def test_feature_cache(tmp_path):
    a = png(tmp_path / "a.png", (10, 20, 30))
    b = png(tmp_path / "b.png", (40, 50, 60))
    c = png(tmp_path / "c.png", (70, 80, 90))
    cache = FeatureCache(tmp_path / "cache", "enc-v1")
    enc = Encoder()
    first = cache.get_many([str(a), str(b)], enc, batch_size=1, progress=False)
    assert first.dtype == np.float32 and first.shape == (2, 3)
    np.testing.assert_allclose(first, [[10, 20, 30], [40, 50, 60]])
    assert enc.seen == [str(a), str(b)]

    enc.seen.clear()  # only c is new
    second = cache.get_many([str(b), str(c), str(a)], enc, progress=False)
    assert enc.seen == [str(c)]
    np.testing.assert_array_equal(second[[2, 0]], first)

    enc.seen.clear()  # a fresh cache object (a new "epoch"/process) computes nothing
    again = FeatureCache(tmp_path / "cache", "enc-v1").get_many([str(b), str(c), str(a)], enc,
                                                                progress=False)
    assert enc.seen == []
    np.testing.assert_array_equal(again, second)
    assert not list((tmp_path / "cache").rglob("*.tmp"))


def test_feature_cache_shares_identical_content(tmp_path):
    a = png(tmp_path / "a.png", (1, 2, 3))
    dup = tmp_path / "renamed.png"
    dup.write_bytes(a.read_bytes())
    enc = Encoder()
    cache = FeatureCache(tmp_path / "cache", "enc")
    out = cache.get_many([str(a), str(dup)], enc, progress=False)
    assert enc.seen == [str(a)]
    np.testing.assert_array_equal(out[0], out[1])
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 1


def test_feature_cache_encoder_id_recomputes(tmp_path):
    a = png(tmp_path / "a.png")
    enc = Encoder()
    FeatureCache(tmp_path / "cache", "enc-v1").get_many([str(a)], enc, progress=False)
    FeatureCache(tmp_path / "cache", "enc-v2").get_many([str(a)], enc, progress=False)
    assert enc.seen == [str(a), str(a)]


def test_feature_cache_bad_compute_and_missing_file(tmp_path):
    a = png(tmp_path / "a.png")
    cache = FeatureCache(tmp_path / "cache", "enc")
    with pytest.raises(ValueError, match="shape"):
        cache.get_many([str(a)], lambda ps: np.zeros((2, 3)), progress=False)
    with pytest.raises(FromageError, match="not found"):
        cache.get_many([str(tmp_path / "gone.png")], Encoder(), progress=False)
