"""Built-in models, each a quanta Service."""

from quanta.models.minilm import MiniLMEmbedder

__all__ = ["MiniLMEmbedder"]
