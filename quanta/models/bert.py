"""A BERT encoder in plain PyTorch, loaded from a Hugging Face model directory.

Written out, rather than taken from `transformers`, so that every matrix
product is a plain `nn.Linear` that the optimizer can quantize, prune or
factorize, and so that a worker starts without importing `transformers`.
The weights and the arithmetic are those of `transformers.BertModel`.

A block may be narrower than its config: pruning removes attention heads and
feed-forward neurons per layer. `BertEncoder.shapes()` records the width of
every block, and `BertEncoder(config, shapes=...)` builds empty blocks of those
widths, so that a pruned model can be saved as config, shapes and weights and
rebuilt with `load_state_dict`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from quanta.errors import ConfigError, ModelError, shorten

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
    """Multi-head self-attention with one fused product for queries, keys and values.

    The head size comes from the config; the number of heads may be smaller
    than the config's once `keep_heads_` has removed some.
    """

    def __init__(self, config: BertConfig, n_head: int | None = None):
        super().__init__()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.n_head = config.num_attention_heads if n_head is None else n_head
        inner = self.n_head * self.head_size
        self.qkv = nn.Linear(config.hidden_size, 3 * inner)
        self.proj = nn.Linear(inner, config.hidden_size)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        inner = self.n_head * self.head_size
        # one product for queries, keys and values, then split into heads
        q, k, v = self.qkv(x).split(inner, dim=2)
        q, k, v = (t.view(B, T, self.n_head, self.head_size).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, nh, T, hs)
        return self.proj(y.transpose(1, 2).reshape(B, T, inner))

    @torch.no_grad()
    def keep_heads_(self, heads: Sequence[int]) -> None:
        """Keep only the given heads, in place: their rows of `qkv`, their columns of `proj`.

        Raises:
            ConfigError: `heads` is empty or names a head this layer does not have.
        """
        heads = sorted(set(heads))
        if not heads or heads[0] < 0 or heads[-1] >= self.n_head:
            raise ConfigError(
                f"heads {shorten(heads)} must be a non-empty subset of 0..{self.n_head - 1}"
            )
        hs, inner = self.head_size, self.n_head * self.head_size
        cols = torch.cat([torch.arange(h * hs, (h + 1) * hs) for h in heads])
        # qkv stacks all query rows, then all key rows, then all value rows
        rows = torch.cat([cols + part * inner for part in range(3)])
        self.qkv = _select(self.qkv, rows=rows)
        self.proj = _select(self.proj, cols=cols)
        self.n_head = len(heads)


class FeedForward(nn.Module):
    def __init__(self, config: BertConfig, intermediate_size: int | None = None):
        super().__init__()
        width = config.intermediate_size if intermediate_size is None else intermediate_size
        self.fc = nn.Linear(config.hidden_size, width)
        self.proj = nn.Linear(width, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(F.gelu(self.fc(x)))


class Block(nn.Module):
    """One encoder layer; BERT normalizes after each residual sum (post-LN)."""

    def __init__(
        self, config: BertConfig, n_head: int | None = None, intermediate_size: int | None = None
    ):
        super().__init__()
        self.attn = SelfAttention(config, n_head)
        self.ln_attn = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = FeedForward(config, intermediate_size)
        self.ln_mlp = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = self.ln_attn(x + self.attn(x, mask))
        return self.ln_mlp(x + self.mlp(x))


@torch.no_grad()
def _select(linear: nn.Linear, *, rows=None, cols=None) -> nn.Linear:
    """A new Linear holding only the given output rows or input columns of `linear`."""
    weight, bias = linear.weight, linear.bias
    if rows is not None:
        weight, bias = weight[rows], None if bias is None else bias[rows]
    if cols is not None:
        weight = weight[:, cols]
    out = nn.Linear(
        weight.shape[1],
        weight.shape[0],
        bias=bias is not None,
        device=weight.device,
        dtype=weight.dtype,
    )
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    return out


class BertEncoder(nn.Module):
    """Token ids in, one hidden state per token out: (B, T) -> (B, T, C).

    Args:
        config: the architecture as read from config.json.
        shapes: the width of each block when it differs from the config, as
            returned by `shapes()` of a pruned encoder: `{"n_head": [...],
            "intermediate_size": [...]}`, one entry per block.

    Raises:
        ConfigError: `shapes` does not describe one valid width per block.
    """

    def __init__(self, config: BertConfig, shapes: dict[str, list[int]] | None = None):
        super().__init__()
        self.config = config
        C = config.hidden_size
        self.wte = nn.Embedding(config.vocab_size, C)
        self.wpe = nn.Embedding(config.max_position_embeddings, C)
        self.wtt = nn.Embedding(config.type_vocab_size, C)
        self.ln_emb = nn.LayerNorm(C, eps=config.layer_norm_eps)
        widths = _check_shapes(shapes, config)
        self.blocks = nn.ModuleList(Block(config, *width) for width in widths)

    def shapes(self) -> dict[str, list[int]]:
        """The width of every block: heads kept and feed-forward neurons kept.

        Example:
            >>> rebuilt = BertEncoder(pruned.config, shapes=pruned.shapes())
            >>> rebuilt.load_state_dict(pruned.state_dict())
        """
        return {
            "n_head": [block.attn.n_head for block in self.blocks],
            "intermediate_size": [block.mlp.fc.out_features for block in self.blocks],
        }

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


def _check_shapes(shapes: dict[str, list[int]] | None, config: BertConfig) -> list[tuple[int, int]]:
    """One (n_head, intermediate_size) per block, checked against the config."""
    layers = config.num_hidden_layers
    if shapes is None:
        return [(config.num_attention_heads, config.intermediate_size)] * layers
    heads, widths = shapes.get("n_head"), shapes.get("intermediate_size")
    if not isinstance(heads, list | tuple) or not isinstance(widths, list | tuple):
        raise ConfigError(
            f"shapes {shorten(shapes)} must map 'n_head' and 'intermediate_size' to lists; "
            "pass the dict that BertEncoder.shapes() returns"
        )
    if len(heads) != layers or len(widths) != layers:
        raise ConfigError(
            f"shapes {shorten(shapes)} must give {layers} widths for each key, one per block"
        )
    for n_head, width in zip(heads, widths, strict=True):
        if not 0 < n_head <= config.num_attention_heads or width < 1:
            raise ConfigError(
                f"shapes {shorten(shapes)} has a block with {n_head} heads and {width} neurons; "
                f"a block keeps 1 to {config.num_attention_heads} heads and at least 1 neuron"
            )
    return list(zip(heads, widths, strict=True))


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
