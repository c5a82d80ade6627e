"""Transformer LMs that expose their kNN keys, and hooks for stock checkpoints."""

from knnlm.models.capture import KEY_TYPES, KeyCapture
from knnlm.models.transformer_lm import KnnTransformerLanguageModel

__all__ = ["KEY_TYPES", "KeyCapture", "KnnTransformerLanguageModel"]
