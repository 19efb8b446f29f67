"""The runtime gives the same greedy tokens and the same retrievals as the PyTorch model, on each
decoder engine: the native one (the fused Llama graph) and ONNX Runtime."""
import pytest
import torch

from fromage.runtime.generate import Fromage
from fromage.runtime.preprocess import preprocess
from fromage.runtime.prompt import ImagePart
from fromage.runtime.sampling import SamplingParams
from fromage.training.reference import reference_generate

ARCHS = ["llama", "opt"]
CASES = [("llama", "native"), ("llama", "onnxruntime"), ("opt", "onnxruntime")]  # (LM, decoder engine)


def _prompts(images):
    return {
        "text": ["a red cat with a big blue dog on the moon"],
        "length-1": [""],  # the tokenizer's BOS alone
        "image-first": [ImagePart(images[1]), "a picture of"],
        "image-middle": ["the small bird", ImagePart(images[2]), "and the boat", ImagePart(images[0]), "with"],
    }


@pytest.mark.parametrize("arch,engine", CASES)
def test_greedy_tokens_match_pytorch(arch, engine, exported, assets):
    e = exported[arch]
    rt = Fromage(e["bundle"], engine=engine)
    assert rt.engine == engine
    params = SamplingParams(max_new_tokens=12, retrieval=False, stop_ids=[])
    for name, parts in _prompts(assets["images"]).items():
        ref = reference_generate(e["model"], parts, params)
        got = rt.generate(parts, params)
        assert got.token_ids == ref["token_ids"], name
    assert len(rt.segments([""])[0]) == 1


def _candidates(model, images):
    with torch.no_grad():
        feats = model.encode_images(torch.from_numpy(preprocess(images, model.encoder.preprocessing)))
        return model.image_embedding(feats)


@pytest.mark.parametrize("arch,engine", CASES)
def test_decoding_across_ret_and_retrieval_match_pytorch(arch, engine, exported, assets):
    e = exported[arch]
    model, images = e["model"], assets["images"]
    rt = Fromage(e["bundle"], index=e["index"], engine=engine)
    paths = sorted(images)  # the index keys images in sorted path order
    cands = _candidates(model, paths)
    params = SamplingParams(max_new_tokens=10, stop_ids=[], min_word_tokens=3, ret_scale_factor=4.0, top_images=5)
    crossed = 0
    for name, parts in _prompts(images).items():
        ref = reference_generate(model, parts, params, candidates=cands)
        got = rt.generate(parts, params)
        assert got.token_ids == ref["token_ids"], name
        ret_parts = [p for p in got.parts if p["type"] == "image"]
        assert [[paths.index(h["path"]) for h in p["ranked"]] for p in ret_parts] == ref["retrievals"], name
        assert all(t != model.ret_id for t in got.token_ids[:3])  # min_word_tokens
        crossed += sum(1 for i, t in enumerate(got.token_ids[:-1]) if t == model.ret_id)
    assert crossed > 0, "no prompt decoded past a [RET]; raise ret_scale_factor"


def test_ret_as_last_token_still_retrieves(exported, assets):
    """The reference indexes out of range when [RET] is the last generated token."""
    e = exported["llama"]
    rt = Fromage(e["bundle"], index=e["index"])
    got = rt.generate(["a red cat"], SamplingParams(max_new_tokens=1, stop_ids=[], ret_scale_factor=1e4))
    assert got.token_ids == [e["model"].ret_id]
    assert got.parts[-1]["type"] == "image" and got.parts[-1]["path"]


def test_max_rets_bans_ret_after_the_limit(exported, assets):
    e = exported["llama"]
    rt = Fromage(e["bundle"], index=e["index"])
    params = SamplingParams(max_new_tokens=6, stop_ids=[], ret_scale_factor=1e4)  # [RET] wins every step
    assert rt.generate(["a red cat"], params).token_ids == [e["model"].ret_id] * 6
    params.max_rets = 2
    got = rt.generate(["a red cat"], params)
    assert got.token_ids[:2] == [e["model"].ret_id] * 2 and e["model"].ret_id not in got.token_ids[2:]
    assert sum(p["type"] == "image" for p in got.parts) == 2
    # the PyTorch reference loop applies the same limit
    model, paths = e["model"], sorted(assets["images"])
    assert reference_generate(model, ["a red cat"], params, candidates=_candidates(model, paths))["token_ids"] \
        == got.token_ids


@pytest.mark.parametrize("arch", ARCHS)
def test_no_retrieval_matches_hf_generate(arch, exported, assets):
    """With [RET] banned, greedy decoding is the base LM's: compare with Hugging Face generate."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = assets[arch]
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    rt = Fromage(exported[arch]["bundle"])
    for text in ["a red cat", "the big blue dog on the moon with a hat", "a"]:
        ids = tok(text, return_tensors="pt").input_ids
        want = hf.generate(ids, max_new_tokens=16, do_sample=False, pad_token_id=0)[0, ids.shape[1]:].tolist()
        got = rt.generate([text], SamplingParams(max_new_tokens=16, retrieval=False))
        assert got.prompt_token_ids == ids[0].tolist()
        want = want[: want.index(2)] if 2 in want else want  # the runtime omits the stop token
        assert got.token_ids == want, text


def test_sampling_is_seeded(exported):
    rt = Fromage(exported["llama"]["bundle"])
    p = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=20, top_p=0.9, seed=7, retrieval=False, stop_ids=[])
    a, b = rt.generate(["a cat"], p), rt.generate(["a cat"], p)
    assert a.token_ids == b.token_ids
    assert rt.generate(["a cat"], SamplingParams(**{**p.__dict__, "seed": 8})).token_ids != a.token_ids
