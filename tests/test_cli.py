"""The CLI contract: JSON output, clear errors, bundle integrity, --no-retrieval."""
import json
import shutil

import pytest

from fromage.tools.cli import main


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_generate_json_contract(exported, assets, capsys):
    e = exported["llama"]
    code, out, _ = _run(capsys, "generate", "--bundle", e["bundle"], "--index", e["index"],
                        "--image", assets["images"][3], "--text", "a red cat", "--max-new-tokens", 6,
                        "--ret-scale-factor", 4, "--min-word-tokens", 1, "--json")
    assert code == 0
    doc = json.loads(out)
    assert set(doc) >= {"parts", "prompt_token_ids", "token_ids"}
    assert 0 < len(doc["token_ids"]) <= 6
    for part in doc["parts"]:
        assert part["type"] in ("text", "image")
        if part["type"] == "image":
            assert part["path"] in assets["images"] and isinstance(part["score"], float)


def test_no_retrieval_never_yields_ret(exported, capsys):
    e = exported["llama"]
    ret = e["model"].ret_id
    code, out, _ = _run(capsys, "generate", "--bundle", e["bundle"], "--index", e["index"], "a red cat",
                        "--max-new-tokens", 8, "--ret-scale-factor", 1e6, "--no-retrieval", "--json")
    assert code == 0
    doc = json.loads(out)
    assert len(doc["token_ids"]) == 8 and ret not in doc["token_ids"]
    assert all(p["type"] == "text" for p in doc["parts"])
    # the same settings with retrieval allowed do pick [RET]: the ban is what removed it
    _, out, _ = _run(capsys, "generate", "--bundle", e["bundle"], "--index", e["index"], "a red cat",
                     "--max-new-tokens", 8, "--ret-scale-factor", 1e6, "--json")
    assert ret in json.loads(out)["token_ids"]


def test_tampered_bundle_is_refused(exported, tmp_path, capsys):
    bundle = tmp_path / "b"
    shutil.copytree(exported["llama"]["bundle"], bundle)
    data = bytearray((bundle / "embed.onnx").read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    (bundle / "embed.onnx").write_bytes(bytes(data))
    code, _, err = _run(capsys, "generate", "--bundle", bundle, "hello")
    assert code == 2 and "embed.onnx" in err and "manifest" in err
    shutil.copy(exported["llama"]["bundle"] / "embed.onnx", bundle / "embed.onnx")
    (bundle / "tokenizer.json").unlink()
    code, _, err = _run(capsys, "generate", "--bundle", bundle, "hello")
    assert code == 2 and "tokenizer.json" in err and "missing" in err


def test_missing_index_and_bad_inputs_give_clear_errors(exported, tmp_path, capsys):
    b = exported["llama"]["bundle"]
    code, _, err = _run(capsys, "generate", "--bundle", b, "--index", tmp_path / "nope", "hi")
    assert code == 2 and "fromage index build" in err
    code, _, err = _run(capsys, "generate", "--bundle", tmp_path / "nobundle", "hi")
    assert code == 2 and "fromage export" in err
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    code, _, err = _run(capsys, "generate", "--bundle", b, "--image", bad, "hi")
    assert code == 2 and "cannot read image" in err
    code, _, err = _run(capsys, "generate", "--bundle", b, "word " * 200)
    assert code == 2 and "context" in err
    with pytest.raises(SystemExit):
        main(["generate", "--bundle", str(b), "--no-such-option"])


def test_index_of_another_bundle_is_refused(exported, capsys):
    code, _, err = _run(capsys, "generate", "--bundle", exported["llama"]["bundle"],
                        "--index", exported["opt"]["index"], "hi")
    assert code == 2 and "index" in err


def test_streaming_text_output(exported, capsys):
    code, out, _ = _run(capsys, "generate", "--bundle", exported["opt"]["bundle"], "a red cat", "--max-new-tokens", 5)
    assert code == 0 and out.strip()
