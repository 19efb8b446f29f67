"""`fromage demo` and the conversation page: a scripted session on a tiny bundle, valid HTML + JSON."""
import json
from html.parser import HTMLParser

from fromage.tools.cli import main
from fromage.tools.html import render_conversation, write_conversation


class _Page(HTMLParser):
    """Collects tags, classes and image sources; fails on nothing but records unbalanced tags."""
    VOID = {"meta", "img", "br", "link", "input", "hr"}

    def __init__(self):
        super().__init__()
        self.stack, self.errors, self.classes, self.imgs, self.external, self.scripts = [], [], [], [], [], 0

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.classes += (a.get("class") or "").split()
        if tag == "script":
            self.scripts += 1
        if tag == "img":
            self.imgs.append(a.get("src", ""))
        for key in ("src", "href"):
            if a.get(key) and not a[key].startswith("data:"):
                self.external.append(a[key])
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_endtag(self, tag):
        if not self.stack or self.stack.pop() != tag:
            self.errors.append(tag)


def _parse(text):
    page = _Page()
    page.feed(text)
    page.close()
    assert not page.errors and not page.stack, (page.errors, page.stack)
    assert not page.external and page.scripts == 0
    return page


def test_render_conversation(assets, tmp_path):
    img = assets["images"]
    turns = [
        {"role": "user", "heading": "A <b>heading</b>", "parts": [{"type": "image", "path": img[0]},
                                                                  "What is <script>alert(1)</script> & this?"]},
        {"role": "model", "parts": [{"type": "text", "text": " A red <i>cat</i> "},
                                    {"type": "image", "path": img[1], "score": 0.4321, "caption": "cat <&>",
                                     "ranked": [{"path": img[1], "score": 0.4321}, {"path": img[2], "score": 0.1}]},
                                    {"type": "text", "text": " and more."}]},
        {"role": "user", "parts": ["again"]},
        {"role": "model", "parts": [{"type": "image", "path": str(tmp_path / "gone.png"), "score": 0.1,
                                     "forced": True}]},
        {"role": "model", "parts": []},
    ]
    text = render_conversation(turns, "Title <x>")
    page = _parse(text)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt; &amp; this?" in text
    assert "A red &lt;i&gt;cat&lt;/i&gt;" in text and "cat &lt;&amp;&gt;" in text and "Title &lt;x&gt;" in text
    assert "A &lt;b&gt;heading&lt;/b&gt;" in text
    assert page.classes.count("user") == 2 and page.classes.count("model") == 3
    assert page.classes.count("bubble") == 5
    assert "0.432" in text and "forced [RET]" in text and "(no answer)" in text
    assert "image not readable" in text and "gone.png" in text  # a missing image is a placeholder
    # images 0, 1 and the second ranked one, all embedded; img0 is RGBA -> PNG
    assert len(page.imgs) == 3 and all(s.startswith("data:image/") and ";base64," in s for s in page.imgs)
    assert page.imgs[0].startswith("data:image/png")
    out = write_conversation(tmp_path / "sub" / "c.html", turns, "Title")
    assert out.read_text().startswith("<!DOCTYPE html>") and [p.name for p in out.parent.iterdir()] == ["c.html"]


def test_thumbnails_are_downscaled(tmp_path):
    import base64
    import io
    from PIL import Image
    from fromage.tools.html import image_data_uri
    big = tmp_path / "big.jpg"
    Image.new("RGB", (1200, 600), (200, 10, 10)).save(big)
    uri = image_data_uri(big)
    assert uri.startswith("data:image/jpeg;base64,")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert max(im.size) == 256 and im.size == (256, 128)


def test_svg_images_are_rendered(tmp_path):
    """An SVG (a third of the TuxPaint stamps) is shown rendered, not as "image not readable"."""
    import base64
    import io
    from PIL import Image
    from fromage.tools.html import image_data_uri
    svg = tmp_path / "square.svg"
    svg.write_text('<svg xmlns="http://www.w3.org/2000/svg" width="600" height="300">'
                   '<rect x="0" y="0" width="300" height="300" fill="#ff0000"/></svg>')
    uri = image_data_uri(svg)
    assert uri is not None and uri.startswith("data:image/")
    with Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))) as im:
        assert im.size == (256, 128)
        r, g, b = im.convert("RGB").getpixel((10, 64))
        assert r > 200 and g < 60 and b < 60  # the red square, drawn
    page = render_conversation([{"role": "model", "parts": [{"type": "image", "path": str(svg), "score": 0.5}]}], "t")
    assert "image not readable" not in page and len(_parse(page).imgs) == 1


def _check_outputs(out_dir, capsys_out, images):
    doc = json.loads((out_dir / "demo.json").read_text())
    turns = doc["turns"]
    assert [t["role"] for t in turns] == ["user", "model"] * 4
    assert sum(1 for t in turns if t.get("heading")) == 3
    # 1: a retrieved image (the model's own [RET] or a forced one); 3: the second turn too
    for i in (1, 7):
        found = [p for p in turns[i]["parts"] if p["type"] == "image"]
        assert found and found[0]["path"] in images and isinstance(found[0]["score"], float)
    assert turns[2]["parts"][0] == {"type": "image", "path": turns[4]["parts"][0]["path"]}
    page = _parse((out_dir / "demo.html").read_text())
    assert page.classes.count("bubble") == 8 and len(page.imgs) >= 4
    lines = capsys_out.strip().splitlines()
    assert lines[-1] == str((out_dir / "demo.html").resolve())
    assert any(line.startswith("[image: ") for line in lines) and "user: Show me a picture of" in capsys_out
    return turns


def test_demo_command(exported, assets, tmp_path, capsys):
    e = exported["llama"]
    out = tmp_path / "out"
    code = main(["demo", "--bundle", str(e["bundle"]), "--index", str(e["index"]), "--out", str(out),
                 "--image", assets["images"][3], "--subject", "red cat", "--max-new-tokens", "4", "--no-verify"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    turns = _check_outputs(out, captured.out, assets["images"])
    assert turns[2]["parts"][0]["path"] == assets["images"][3]
    assert turns[0]["parts"] == ["Show me a picture of a red cat."]

    # without --image and without the TuxPaint stamps: the first indexed image is the input
    out2 = tmp_path / "out2"
    code = main(["demo", "--bundle", str(e["bundle"]), "--index", str(e["index"]), "--out", str(out2),
                 "--stamps", str(tmp_path / "no-stamps"), "--max-new-tokens", "3", "--ret-scale-factor", "1e6",
                 "--min-word-tokens", "1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    turns = _check_outputs(out2, captured.out, assets["images"])
    assert turns[2]["parts"][0]["path"] == sorted(assets["images"])[0]
    # with [RET] pushed up, the model emits it itself: nothing is forced
    assert any(p["type"] == "image" and not p.get("forced") for p in turns[1]["parts"])


def test_demo_builds_a_missing_index(exported, assets, tmp_path, capsys):
    e = exported["opt"]
    out = tmp_path / "out"
    code = main(["demo", "--bundle", str(e["bundle"]), "--out", str(out), "--stamps", str(assets["root"] / "images"),
                 "--max-new-tokens", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert (out / "tuxpaint-index" / "index.json").is_file() and "indexing the images" in captured.out
    _check_outputs(out, captured.out, assets["images"])
    # a missing index with nothing to build it from is a clear error
    code = main(["demo", "--bundle", str(e["bundle"]), "--out", str(tmp_path / "o3"),
                 "--stamps", str(tmp_path / "none")])
    assert code == 2 and "tuxpaint-stamps-default" in capsys.readouterr().err


def test_demo_reexports_its_bundle_when_the_shipped_checkpoint_changed(tmp_path, monkeypatch):
    import json
    from fromage.tools import demo
    from fromage.runtime.files import sha256_file
    calls = []
    monkeypatch.setattr(demo.subprocess, "call", lambda cmd, env=None: calls.append(cmd) or 0)
    bundle = tmp_path / "default-bundle"
    bundle.mkdir()

    def built_from(sha):
        (bundle / "manifest.json").write_text(json.dumps({"model": {"checkpoint_sha256": sha}}))
    built_from(sha256_file(demo.SHIPPED_CHECKPOINT))
    demo.ensure_bundle(bundle, managed=True)
    assert calls == []  # up to date: reused
    built_from("an older checkpoint")
    demo.ensure_bundle(bundle, managed=False)
    assert calls == []  # a bundle the user named is never replaced
    demo.ensure_bundle(bundle, managed=True)
    assert len(calls) == 1 and calls[0][-1] == "--overwrite" and "--default" in calls[0]
