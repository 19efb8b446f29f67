"""Tiny randomly initialised models built from configs, and generated images: no downloads."""
from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest

WORDS = ("a red blue green small big cat dog bird tree house car boat sun moon star the of with "
         "on in and picture photo drawing kangaroo apple ball hat flower fish").split()


def make_tokenizer(bos: str):
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, processors, trainers
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    import random
    rnd = random.Random(0)
    corpus = [" ".join(rnd.choice(WORDS) for _ in range(12)) for _ in range(400)]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A $B", special_tokens=[(bos, tok.token_to_id(bos))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token="</s>", unk_token="<unk>")


def make_lm(arch: str, folder):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM
    torch.manual_seed(0)
    tok = make_tokenizer("</s>" if arch == "opt" else "<s>")
    v = len(tok)
    if arch == "opt":
        cfg = OPTConfig(vocab_size=v, hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
                        max_position_embeddings=96, word_embed_proj_dim=32, bos_token_id=2, eos_token_id=2,
                        pad_token_id=1)
        lm = OPTForCausalLM(cfg)
    else:
        # llama_mlp2: an inner dimension of 4 whole 32-blocks, which the native decoder computes in two parts
        cfg = LlamaConfig(vocab_size=v, hidden_size=64, intermediate_size=128 if arch == "llama_mlp2" else 96,
                          num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=96,
                          tie_word_embeddings=(arch != "llama_untied"), bos_token_id=1, eos_token_id=2)
        lm = LlamaForCausalLM(cfg)
    lm.generation_config.eos_token_id = 2
    lm.save_pretrained(folder)
    tok.save_pretrained(folder)
    return str(folder)


def make_clip(folder):
    import torch
    from transformers import CLIPVisionConfig, CLIPVisionModel
    torch.manual_seed(0)
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(folder)
    return str(folder)


def make_images(folder, n: int = 8):
    """Distinct generated pictures: coloured shapes on varied backgrounds, one RGBA."""
    from PIL import Image, ImageDraw
    import random
    folder.mkdir(parents=True, exist_ok=True)
    rnd, paths = random.Random(1), []
    for i in range(n):
        mode = "RGBA" if i == 0 else "RGB"
        img = Image.new(mode, (40 + 7 * i, 36 + 3 * i), tuple(rnd.randrange(256) for _ in range(len(mode))))
        d = ImageDraw.Draw(img)
        d.ellipse((4, 4, 20 + i, 24), fill=tuple(rnd.randrange(256) for _ in range(len(mode))))
        path = folder / f"img{i}.png"
        img.save(path)
        paths.append(str(path))
    return paths


@pytest.fixture(scope="session")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    return {"llama": make_lm("llama", root / "llama"), "llama_untied": make_lm("llama_untied", root / "llama_untied"),
            "llama_mlp2": make_lm("llama_mlp2", root / "llama_mlp2"),
            "opt": make_lm("opt", root / "opt"), "clip": make_clip(root / "clip"),
            "images": make_images(root / "images"), "root": root}


def build_model(assets, arch: str, k: int = 2, seed: int = 0, query_template: str = "{}"):
    from fromage.training.model import FromageConfig, FromageModel
    return FromageModel(FromageConfig(lm=assets[arch], encoder={"type": "clip", "path": assets["clip"]},
                                      k=k, retrieval_dim=16, seed=seed, query_template=query_template))


@pytest.fixture(scope="session")
def exported(assets, tmp_path_factory):
    """Per architecture: the PyTorch model, its bundle and an index of the generated images."""
    import logging
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    from fromage.export.bundle_writer import write_bundle
    from fromage.tools.cli import main
    root = tmp_path_factory.mktemp("bundles")
    out = {}
    import torch
    from fromage.training.heldout import ret_hidden
    for arch, k in (("llama", 2), ("opt", 1)):
        # Llama: a query template and W_t input statistics, as the default model has (folded at export)
        model = build_model(assets, arch, k=k, query_template="A picture of {}:" if arch == "llama" else "{}")
        if arch == "llama":
            model.set_text_statistics(ret_hidden(model, [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]))
        with torch.no_grad():  # an untrained output row is the mean row (logit ~0 here): make [RET] likely
            model.ret_output.copy_(model.ret_embedding)
        write_bundle(model, root / arch, log=lambda *_: None)
        index = root / f"{arch}-index"
        assert main(["index", "build", str(assets["root"] / "images"), "--bundle", str(root / arch),
                     "--out", str(index)]) == 0
        out[arch] = {"model": model, "bundle": root / arch, "index": index}
    return out


class LiveServer:
    """`fromage serve`'s app on a free localhost port, in a thread (uvicorn), over a given model."""

    def __init__(self, model, **config):
        import socket
        import threading
        import time

        import uvicorn

        from fromage.serve.app import ServerConfig, create_app
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.app = create_app(ServerConfig(bundle=str(model.bundle.directory), **config), model=model)
        self.server = uvicorn.Server(uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.time() + 30
        while not (self.server.started and self.app.state.fromage.model is not None):
            assert time.time() < deadline, f"the server did not start: {self.app.state.fromage.load_error}"
            time.sleep(0.02)

    def close(self):
        self.server.should_exit = True
        self.thread.join(timeout=10)


@pytest.fixture(scope="session")
def served_model(exported):
    """One loaded tiny Llama model with its index, shared by the server tests."""
    from fromage.runtime.generate import Fromage
    return Fromage(exported["llama"]["bundle"], index=exported["llama"]["index"])
