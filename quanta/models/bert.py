"""A BERT encoder in plain PyTorch, loaded from a Hugging Face model directory.

Written out, rather than taken from `transformers`, so that every matrix
product is a plain `nn.Linear` that the optimizer can quantize, prune or
factorize, and so that a worker starts without importing `transformers`.
The weights and the arithmetic are those of `transformers.BertModel`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from quanta.errors import ModelError

__all__ = ["BertConfig", "BertEncoder", "load_bert"]


@dataclass(frozen=True)
class BertConfig:
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    @classmethod
    def from_json(cls, path: Path) -> BertConfig:
        raw = json.loads(path.read_text())
        if raw.get("model_type") != "bert" or raw.get("hidden_act", "gelu") != "gelu":
            raise ModelError(
                f"{path} describes a {raw.get('model_type')!r} model with "
                f"{raw.get('hidden_act')!r}; quanta's encoder loads BERT with gelu"
            )
        return cls(**{name: raw[name] for name in cls.__dataclass_fields__})


class SelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.n_head = config.num_attention_heads
        self.qkv = nn.Linear(config.hidden_size, 3 * config.hidden_size)
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # one product for queries, keys and values, then split into heads
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.proj = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One encoder layer; BERT normalizes after each residual sum (post-LN)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.attn = SelfAttention(config)
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn(x + self.attn(x, mask))
        return self.ln_mlp(x + self.mlp(x))


class BertEncoder(nn.Module):
    """Token ids in, one hidden state per token out: (B, T) -> (B, T, C)."""

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.max_position_embeddings, C)
        self.wtt = nn.Embedding(config.type_vocab_size, C)
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        B, T = input_ids.shape
        # every input is a single segment, so the token type is always 0
        pos = torch.arange(T, device=input_ids.device)
        x = self.wte(input_ids) + self.wpe(pos) + self.wtt.weight[0]
        x = self.ln_emb(x)
        # (B, 1, 1, T): every query may attend to every real (unpadded) key
        mask = attention_mask.bool()[:, None, None, :]
        for block in self.blocks:
            x = block(x, mask)
        return x


def _rename(state: dict[str, torch.Tensor], config: BertConfig) -> dict[str, torch.Tensor]:
    """Map Hugging Face BertModel weight names onto this module's names."""
    out = {
        "wte.weight": state["embeddings.word_embeddings.weight"],
        "wpe.weight": state["embeddings.position_embeddings.weight"],
        "wtt.weight": state["embeddings.token_type_embeddings.weight"],
        "ln_emb.weight": state["embeddings.LayerNorm.weight"],
        "ln_emb.bias": state["embeddings.LayerNorm.bias"],
    }
    for i in range(config.num_hidden_layers):
        src, dst = f"encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            out[f"{dst}attn.qkv.{kind}"] = torch.cat(
                [state[f"{src}attention.self.{n}.{kind}"] for n in ("query", "key", "value")]
            )
            out[f"{dst}attn.proj.{kind}"] = state[f"{src}attention.output.dense.{kind}"]
            out[f"{dst}ln_attn.{kind}"] = state[f"{src}attention.output.LayerNorm.{kind}"]
            out[f"{dst}mlp.fc.{kind}"] = state[f"{src}intermediate.dense.{kind}"]
            out[f"{dst}mlp.proj.{kind}"] = state[f"{src}output.dense.{kind}"]
            out[f"{dst}ln_mlp.{kind}"] = state[f"{src}output.LayerNorm.{kind}"]
    return out


def load_bert(directory: str | Path) -> BertEncoder:
    """Load a BERT encoder from a directory with config.json and model.safetensors.

    Raises:
        ModelError: a file is missing, or its weights do not fit the config.
    """
    directory = Path(directory)
    for name in ("config.json", "model.safetensors"):
        if not (directory / name).is_file():
            raise ModelError(f"model directory {str(directory)!r} has no {name}")
    config = BertConfig.from_json(directory / "config.json")
    state = load_file(directory / "model.safetensors")
    # some exports prefix every name with the architecture's base name
    state = {k.removeprefix("bert."): v for k, v in state.items()}
    model = BertEncoder(config)
    try:
        model.load_state_dict(_rename(state, config))
    except (KeyError, RuntimeError) as exc:
        raise ModelError(
            f"{directory / 'model.safetensors'} does not hold BERT weights for its config: {exc}"
        ) from exc
    return model.eval()
