"""``knnlm_transformer_lm``: fairseq's transformer LM, returning its kNN keys.

The forward returns fairseq's usual ``(logits_or_features, extra)`` and adds
``extra["att"]`` and ``extra["ffn"]`` (batch-first ``B x T x C``, graph kept;
see :mod:`knnlm.models.capture`). Parameters and state-dict keys are those of
stock ``transformer_lm``, so checkpoints move between the two freely.

Presets (``--arch``):

* ``knnlm_transformer_lm``        base: 6 layers, 512-d, pre-norm.
* ``knnlm_transformer_lm_tiny``   2 layers, 64-d: tests and the demo.
* ``knnlm_transformer_lm_small``  3 layers, 256-d, adaptive softmax 2000,10000:
                                  the CPU-sized model of the small-scale runs.
* ``knnlm_transformer_lm_wiki2``  WIKI-2 model of the regularized-training runs
                                  (see README: the paper does not list it).
* ``knnlm_transformer_lm_wiki103`` Baevski & Auli (2019) adaptive-input LM as used
                                  by Khandelwal et al. (2020): 16 layers, 1024-d,
                                  16 heads, 4096 FFN, adaptive input/softmax.

Unlike stock ``transformer_lm``, ``decoder_input_dim``/``decoder_output_dim``
default to ``decoder_embed_dim`` (stock keeps them at 512 and silently adds
projections), and post-norm blocks are available with ``--decoder-post-norm``
(stock ``transformer_lm`` always forces pre-norm).
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Optional

from fairseq.models import register_model, register_model_architecture
from fairseq.models.transformer_lm import (
    TransformerLanguageModel,
    TransformerLanguageModelConfig,
    base_lm_architecture,
)
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf, open_dict

from knnlm.models.capture import KeyCapture


@dataclass
class KnnTransformerLanguageModelConfig(TransformerLanguageModelConfig):
    decoder_input_dim: Optional[int] = field(
        default=None, metadata={"help": "decoder input dimension (default: decoder_embed_dim)"}
    )
    decoder_output_dim: Optional[int] = field(
        default=None, metadata={"help": "decoder output dimension (default: decoder_embed_dim)"}
    )
    decoder_post_norm: bool = field(
        default=False,
        metadata={"help": "post-norm blocks (LayerNorm after each residual) instead of pre-norm"},
    )


@register_model("knnlm_transformer_lm", dataclass=KnnTransformerLanguageModelConfig)
class KnnTransformerLanguageModel(TransformerLanguageModel):
    """A transformer LM whose forward also returns the ``att`` and ``ffn`` keys."""

    def __init__(self, decoder):
        super().__init__(decoder)
        self.key_capture = KeyCapture(decoder)

    @classmethod
    def build_model(cls, args, task):
        # `--arch knnlm_transformer_lm` gets only the dataclass defaults from fairseq;
        # resolve the derived ones here (idempotent for the presets).
        with open_dict(args) if OmegaConf.is_config(args) else ExitStack():
            knnlm_base_architecture(args)
        return super().build_model(args, task)

    def forward(self, src_tokens, **kwargs):
        self.key_capture.clear()
        output, extra = self.decoder(src_tokens, **kwargs)
        extra.update(self.key_capture.pop_all())
        return output, extra

    def extract_features(self, src_tokens, **kwargs):
        kwargs.setdefault("encoder_out", None)
        self.key_capture.clear()
        features, extra = self.decoder.extract_features(src_tokens, **kwargs)
        extra.update(self.key_capture.pop_all())
        return features, extra


def _set_default(args, name: str, value) -> None:
    """Set ``args.name`` unless the user gave it (absent or None counts as not given)."""
    if safe_getattr(args, name, None) is None:
        setattr(args, name, value)


def knnlm_base_architecture(args) -> None:
    _set_default(args, "decoder_embed_dim", 512)
    _set_default(args, "decoder_input_dim", args.decoder_embed_dim)
    _set_default(args, "decoder_output_dim", args.decoder_embed_dim)
    post_norm = bool(safe_getattr(args, "decoder_post_norm", False))
    args.decoder_post_norm = post_norm
    base_lm_architecture(args)  # forces pre-norm; undone below when post-norm is asked for
    args.decoder_normalize_before = not post_norm


@register_model_architecture("knnlm_transformer_lm", "knnlm_transformer_lm_tiny")
def knnlm_transformer_lm_tiny(args) -> None:
    _set_default(args, "decoder_layers", 2)
    _set_default(args, "decoder_embed_dim", 64)
    _set_default(args, "decoder_ffn_embed_dim", 256)
    _set_default(args, "decoder_attention_heads", 4)
    _set_default(args, "share_decoder_input_output_embed", True)
    _set_default(args, "dropout", 0.1)
    knnlm_base_architecture(args)


@register_model_architecture("knnlm_transformer_lm", "knnlm_transformer_lm_small")
def knnlm_transformer_lm_small(args) -> None:
    _set_default(args, "decoder_layers", 3)
    _set_default(args, "decoder_embed_dim", 256)
    _set_default(args, "decoder_ffn_embed_dim", 1024)
    _set_default(args, "decoder_attention_heads", 4)
    _set_default(args, "dropout", 0.2)
    _set_default(args, "adaptive_softmax_cutoff", "2000,10000")
    knnlm_base_architecture(args)


@register_model_architecture("knnlm_transformer_lm", "knnlm_transformer_lm_wiki2")
def knnlm_transformer_lm_wiki2(args) -> None:
    _set_default(args, "decoder_layers", 8)
    _set_default(args, "decoder_embed_dim", 512)
    _set_default(args, "decoder_ffn_embed_dim", 2048)
    _set_default(args, "decoder_attention_heads", 8)
    _set_default(args, "dropout", 0.3)
    _set_default(args, "attention_dropout", 0.1)
    _set_default(args, "activation_dropout", 0.1)
    _set_default(args, "adaptive_input", True)
    _set_default(args, "tie_adaptive_weights", True)
    _set_default(args, "tie_adaptive_proj", True)
    _set_default(args, "adaptive_input_cutoff", "2000,10000")
    _set_default(args, "adaptive_softmax_cutoff", "2000,10000")
    _set_default(args, "adaptive_softmax_dropout", 0.2)
    knnlm_base_architecture(args)


@register_model_architecture("knnlm_transformer_lm", "knnlm_transformer_lm_wiki103")
def knnlm_transformer_lm_wiki103(args) -> None:
    _set_default(args, "decoder_layers", 16)
    _set_default(args, "decoder_embed_dim", 1024)
    _set_default(args, "decoder_ffn_embed_dim", 4096)
    _set_default(args, "decoder_attention_heads", 16)
    _set_default(args, "dropout", 0.3)
    _set_default(args, "attention_dropout", 0.1)
    _set_default(args, "activation_dropout", 0.1)
    _set_default(args, "adaptive_input", True)
    _set_default(args, "tie_adaptive_weights", True)
    _set_default(args, "tie_adaptive_proj", True)
    _set_default(args, "adaptive_input_cutoff", "20000,60000")
    _set_default(args, "adaptive_softmax_cutoff", "20000,60000")
    _set_default(args, "adaptive_softmax_dropout", 0.2)
    _set_default(args, "no_decoder_final_norm", True)
    knnlm_base_architecture(args)
