"""The FROMAGe model: a frozen causal LM and a frozen image encoder tied together by learned pieces.

Learned (and nothing else): the `[RET]` input-embedding row, the `[RET]` output row (its own
parameter even when the LM ties its tables: how likely [RET] is to be emitted and what its state
embeds are different jobs), `W_c` (image -> k visual tokens), `W_t` (LM hidden at `[RET]` -> retrieval
space), `W_i` (image -> retrieval space) and the contrastive logit scale.

Unlike the reference (which makes the whole embedding table trainable and zeroes every other
row's gradient), the `[RET]` rows are separate parameters substituted into the lookup and the
logits; the frozen tables are never touched, and export writes the learned rows into them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from fromage.runtime.errors import FromageError
from fromage.runtime.prompt import query_text, special_prefix

from .backbones import load_lm
from .encoders import build_encoder

CHECKPOINT_FORMAT = "fromage-checkpoint"


@dataclass
class FromageConfig:
    lm: str = "default"                       # a Hugging Face folder, or "default" (SmolLM2-135M)
    encoder: dict = field(default_factory=lambda: {"type": "efficientnet-lite0"})
    k: int = 1                                # visual tokens per image
    retrieval_dim: int = 256
    ret_token: str = "[RET]"
    seed: int = 0                             # initialisation of the learned pieces
    # How a text query is written before [RET] ("{}" = the text), like CLIP's "a photo of a {}".
    # Contexts (a dialogue, a story, the model's own answer) are followed by [RET] as they are.
    query_template: str = "{}"
    # A word whose input embedding initialises [RET] (default: a random direction of the mean norm). The
    # default model's template ends where this word would follow, so [RET] starts from the state the
    # frozen LM has there.
    ret_init: str | None = None
    # Set by training/naming.py: W_c's k visual tokens are this text's token embeddings (fixed) with the
    # image-dependent row in its "{}" slot. Checkpoints then store only the slot's rows of W_c (`compact_w_c`).
    visual_template: str | None = None

    @classmethod
    def from_dict(cls, d: dict) -> "FromageConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


class FromageModel(nn.Module):
    def __init__(self, config: FromageConfig, lm=None, tokenizer=None, encoder=None):
        super().__init__()
        self.config = config
        if lm is None:
            lm, tokenizer = load_lm(config.lm)
        self.lm = lm.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.encoder = (encoder or build_encoder(config.encoder)).eval().requires_grad_(False)

        tokenizer.add_tokens([config.ret_token])
        self.ret_id = tokenizer.convert_tokens_to_ids(config.ret_token)
        self.prefix = special_prefix(tokenizer.backend_tokenizer)  # BOS etc., as the runtime places it
        if self.ret_id >= self.lm.get_input_embeddings().num_embeddings:
            self.lm.resize_token_embeddings(self.ret_id + 1, mean_resizing=False)
        self.lm.requires_grad_(False)

        table = self.lm.get_input_embeddings().weight
        head = self.lm.get_output_embeddings()
        self.tied = head.weight is table
        self.embed_dim = table.shape[1]
        self.hidden_dim = head.weight.shape[1]
        d, r, k = self.encoder.dim, config.retrieval_dim, config.k

        g = torch.Generator().manual_seed(config.seed)
        mean_norm = table[: self.ret_id].norm(dim=1).mean()
        init = torch.randn(self.embed_dim, generator=g)
        self.ret_embedding = nn.Parameter(init / init.norm() * mean_norm)
        if config.ret_init:
            word = tokenizer.backend_tokenizer.encode(config.ret_init, add_special_tokens=False).ids
            if len(word) != 1:
                raise FromageError(f"ret_init {config.ret_init!r} is {len(word)} tokens, not one")
            self.ret_embedding = nn.Parameter(table[word[0]].detach().clone())
        self.ret_output = nn.Parameter(head.weight[: self.ret_id].mean(0).clone())
        self.W_c = nn.Linear(d, self.embed_dim * k)
        self.W_t = nn.Linear(self.hidden_dim, r)
        self.W_i = nn.Linear(d, r)
        for lin in (self.W_c, self.W_t, self.W_i):
            nn.init.normal_(lin.weight, std=1 / math.sqrt(lin.in_features), generator=g)
            nn.init.zeros_(lin.bias)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))
        # W_t reads the hidden state standardised per dimension by statistics of the training
        # captions (a few dimensions of an LM's last hidden state are orders of magnitude larger
        # than the rest and would dominate a linear map); fixed during training, folded into W_t
        # at export (`retrieval_head`). Identity until `set_text_statistics`.
        self.checkpoint_sha256 = None  # of the learned.safetensors it was loaded from (recorded in bundles)
        self.register_buffer("text_mean", torch.zeros(self.hidden_dim))
        self.register_buffer("text_std", torch.ones(self.hidden_dim))
        if "{}" not in config.query_template:
            raise FromageError(f"query_template {config.query_template!r} has no '{{}}' for the text")

    # ---- the learned pieces -------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def checkpoint_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint holds: the learned pieces and W_t's input statistics."""
        return {**self.learned_state(), "text_mean": self.text_mean, "text_std": self.text_std}

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        emb = self.lm.get_input_embeddings()(ids)
        is_ret = (ids == self.ret_id).unsqueeze(-1)
        return torch.where(is_ret, self.ret_embedding.to(emb.dtype).expand_as(emb), emb)

    def visual_tokens(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D) image features -> (B, k, E) inputs for the LM."""
        return self.W_c(features).view(features.shape[0], self.config.k, self.embed_dim)

    def image_embedding(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.W_i(features), dim=-1)

    def text_embedding(self, hidden_at_ret: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.W_t((hidden_at_ret - self.text_mean) / self.text_std), dim=-1)

    @torch.no_grad()
    def set_text_statistics(self, hidden_at_ret: torch.Tensor) -> None:
        """Standardise W_t's input by these (N, H) hidden states (tiny spreads are floored)."""
        std = hidden_at_ret.std(0)
        self.text_mean.copy_(hidden_at_ret.mean(0))
        self.text_std.copy_(std.clamp_min(float(std.mean()) * 1e-2 + 1e-12))

    @torch.no_grad()
    def retrieval_head(self) -> nn.Linear:
        """W_t with the standardisation folded in: the single linear map the exported graph applies."""
        head = nn.Linear(self.hidden_dim, self.config.retrieval_dim)
        head.weight.copy_(self.W_t.weight / self.text_std)
        head.bias.copy_(self.W_t.bias - head.weight @ self.text_mean)
        return head

    def query_text(self, text: str) -> str:
        return query_text(self.config.query_template, text)

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encoder(pixel_values)

    def ret_logit(self, hidden: torch.Tensor) -> torch.Tensor:
        """The [RET] logit of hidden states (..., H): the learned output row."""
        bias = self.lm.get_output_embeddings().bias
        z = hidden @ self.ret_output
        return z if bias is None else z + bias[self.ret_id]

    def forward_lm(self, inputs_embeds, attention_mask=None):
        """-> (last hidden after the final norm (B,S,H), logits (B,S,V) with the learned [RET] column)."""
        out = self.lm.base_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask)
        hidden = out.last_hidden_state
        logits = self.lm.get_output_embeddings()(hidden)
        ret_logit = self.ret_logit(hidden)
        col = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
        col[self.ret_id] = True
        return hidden, torch.where(col, ret_logit.unsqueeze(-1), logits)

    @torch.no_grad()
    def merged_lm(self):
        """The LM with the learned [RET] rows written into its tables (for export). A tied LM's head is
        untied here (a copy of the table), so its [RET] output row can be the learned one."""
        table = self.lm.get_input_embeddings().weight
        table[self.ret_id] = self.ret_embedding
        head = self.lm.get_output_embeddings()
        if head.weight is table:
            head.weight = nn.Parameter(table.detach().clone(), requires_grad=False)
            self.lm.config.tie_word_embeddings = False
        head.weight[self.ret_id] = self.ret_output
        return self.lm

    # ---- checkpoints: learned pieces only --------------------------------------------
    def save_checkpoint(self, directory, extra: dict | None = None) -> None:
        from safetensors.torch import save_file
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {n: p.detach().contiguous().clone() for n, p in self.checkpoint_state().items()}
        if self.config.visual_template:
            from .naming import compact_w_c
            tensors.update(compact_w_c(self))
        tmp = directory / "learned.safetensors.tmp"
        save_file(tensors, tmp)
        tmp.replace(directory / "learned.safetensors")
        meta = {"format": CHECKPOINT_FORMAT, "version": 1, **asdict(self.config), **(extra or {})}
        (directory / "config.json.tmp").write_text(json.dumps(meta, indent=2))
        (directory / "config.json.tmp").replace(directory / "config.json")

    def load_learned(self, directory) -> dict:
        from safetensors.torch import load_file
        state = load_file(Path(directory) / "learned.safetensors")
        own = self.checkpoint_state()
        if self.config.visual_template and state.get("W_c.weight") is not None \
                and state["W_c.weight"].shape != own["W_c.weight"].shape:
            from .naming import expand_w_c
            state.update(expand_w_c(self, state["W_c.weight"], state["W_c.bias"]))
        # checkpoints from before the statistics existed read W_t's input as it is (identity); those of
        # tied LMs from before [RET] had its own output row used the input row
        if self.tied and "ret_output" not in state and "ret_embedding" in state:
            state["ret_output"] = state["ret_embedding"]
        missing = set(own) - set(state) - {"text_mean", "text_std"}
        if missing or set(state) - set(own):
            raise FromageError(f"{directory}: checkpoint holds {sorted(state)}, model expects {sorted(own)}")
        with torch.no_grad():
            for n, t in state.items():
                if own[n].shape != t.shape:
                    raise FromageError(f"{directory}: {n} has shape {tuple(t.shape)}, "
                                       f"model expects {tuple(own[n].shape)}")
                own[n].copy_(t)
        return json.loads((Path(directory) / "config.json").read_text())

    @classmethod
    def from_checkpoint(cls, directory, **backbones) -> "FromageModel":
        directory = Path(directory)
        cfg_file = directory / "config.json"
        if not cfg_file.is_file() or not (directory / "learned.safetensors").is_file():
            raise FromageError(f"{directory} is not a fromage checkpoint "
                               f"(expected config.json and learned.safetensors)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != CHECKPOINT_FORMAT:
            raise FromageError(f"{cfg_file} is not a fromage checkpoint config")
        model = cls(FromageConfig.from_dict(meta), **backbones)
        model.load_learned(directory)
        from fromage.runtime.files import sha256_file
        model.checkpoint_sha256 = sha256_file(directory / "learned.safetensors")
        return model
