"""``--arch knnlm_ds_replacement``: a trainable datastore replacement on top of a frozen base LM.

The base LM is loaded from ``--base-checkpoint``, frozen (``requires_grad`` off, kept
in eval mode so its dropout never fires) and run under ``no_grad``; only the head
sees gradients. The head reads the base's ``att`` or ``ffn`` representation and
returns word log-probabilities, so ``fairseq-train --task language_modeling`` trains
it with the ``ds_replacement`` criterion and ``fairseq-eval-lm`` evaluates it.

Checkpoints hold the head only; loading one loads the base from
``--base-checkpoint`` again, which keeps them small and the base bit-identical.
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from fairseq.dataclass import ChoiceEnum, FairseqDataclass
from fairseq.models import BaseFairseqModel, register_model
from torch import Tensor, nn

from knnlm.errors import KnnlmError
from knnlm.models.capture import KEY_TYPES, KeyCapture, key_dim
from knnlm.models.loading import fairseq_hydra_compat
from knnlm.softmax_alternatives.aggregation import sized_row_word, uniform_row_word
from knnlm.softmax_alternatives.base import output_linear_map, output_log_probs, output_target_log_probs
from knnlm.softmax_alternatives.clusters import load_clusters
from knnlm.softmax_alternatives.heads import ClusteredDatastore, LearnedDatastore, MixtureOfSoftmaxes

logger = logging.getLogger(__name__)

KINDS = ("learned", "mos", "clusters")
BASE_PREFIX = "base."


@dataclass
class DatastoreReplacementConfig(FairseqDataclass):
    base_checkpoint: str = field(default="", metadata={"help": "frozen base LM checkpoint (required)"})
    ds_key: ChoiceEnum(list(KEY_TYPES)) = field(
        default="att", metadata={"help": "h_ds: att (input of the last FFN) or ffn (final hidden state)"}
    )
    ds_kind: ChoiceEnum(list(KINDS)) = field(
        default="learned",
        metadata={"help": "learned: W_ds of n·V rows (or --ds-sizes); mos: mixture of softmaxes; "
                  "clusters: k-means centroids of the datastore (--ds-clusters)"},
    )
    ds_n: int = field(default=1, metadata={"help": "rows of W_ds per word (the n of nV x D)"})
    ds_sizes: str = field(
        default="", metadata={"help": "per-word row counts (.npy from `knnlm replace sizes`); overrides --ds-n"}
    )
    ds_init: ChoiceEnum(["lm", "random"]) = field(
        default="lm",
        metadata={"help": "lm: every row starts as its word's base output embedding (exact for a plain "
                  "softmax, first-order for an adaptive one); random: N(0, 1/D)"},
    )
    ds_init_noise: float = field(
        default=0.02, metadata={"help": "std of noise added to --ds-init lm rows (breaks the symmetry of copies)"}
    )
    mos_components: int = field(default=3, metadata={"help": "R, the number of softmaxes mixed"})
    mos_train_output: bool = field(
        default=False, metadata={"help": "also fine-tune the output embeddings W_sm (else frozen)"}
    )
    ds_clusters: str = field(default="", metadata={"help": "clusters folder from `knnlm replace clusters`"})
    ds_train_centroids: bool = field(default=False, metadata={"help": "fine-tune the cluster centroids"})


def load_frozen_base(checkpoint: str, data: str) -> nn.Module:
    """The base LM with every parameter frozen, in eval mode."""
    from fairseq import checkpoint_utils

    path = Path(checkpoint)
    if not checkpoint:
        raise KnnlmError("--base-checkpoint is required: the frozen LM whose att/ffn the head reads")
    if not path.is_file():
        raise KnnlmError(f"--base-checkpoint {path} does not exist")
    with fairseq_hydra_compat():
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task([str(path)], arg_overrides={"data": data})
    base = models[0]
    for p in base.parameters():
        p.requires_grad_(False)
    return base.eval()


def build_head(cfg: DatastoreReplacementConfig, base: nn.Module, vocab_size: int) -> nn.Module:
    decoder = base.decoder
    dim = key_dim(decoder, cfg.ds_key)
    kind = str(cfg.ds_kind)
    if kind == "clusters":
        if not cfg.ds_clusters:
            raise KnnlmError("--ds-kind clusters needs --ds-clusters DIR (build it with `knnlm replace clusters`)")
        centroids, m, meta = load_clusters(cfg.ds_clusters, vocab_size)
        if meta.get("key_type") not in (None, str(cfg.ds_key)) or centroids.shape[1] != dim:
            raise KnnlmError(
                f"--ds-clusters {cfg.ds_clusters} holds {meta.get('key_type')} keys of dimension "
                f"{centroids.shape[1]}; --ds-key {cfg.ds_key} has dimension {dim}"
            )
        return ClusteredDatastore(centroids, m, meta.get("similarity", "l2"), bool(cfg.ds_train_centroids))
    weight, bias, exact = output_linear_map(decoder)
    if weight.shape != (vocab_size, dim):
        if kind == "mos" or cfg.ds_init == "lm":
            raise KnnlmError(
                f"the base output layer is {tuple(weight.shape)}, but --ds-key {cfg.ds_key} is {dim}-d for a "
                f"{vocab_size}-word vocabulary: use --ds-init random (MoS needs matching dimensions)"
            )
    if kind == "mos":
        return MixtureOfSoftmaxes(dim, vocab_size, cfg.mos_components, weight, bias, bool(cfg.mos_train_output))
    if cfg.ds_sizes:
        sizes = torch.from_numpy(np.load(cfg.ds_sizes)).long()
        if sizes.numel() != vocab_size:
            raise KnnlmError(f"--ds-sizes {cfg.ds_sizes} has {sizes.numel()} entries, the vocabulary {vocab_size}")
        row_word = sized_row_word(sizes)
    else:
        if cfg.ds_n < 1:
            raise KnnlmError(f"--ds-n must be >= 1, got {cfg.ds_n}")
        row_word = uniform_row_word(vocab_size, cfg.ds_n)
    if cfg.ds_init == "lm":
        if not exact:
            logger.info("initialising W_ds from the first-order linear part of the base's adaptive softmax")
        return LearnedDatastore(dim, vocab_size, row_word, weight, bias, cfg.ds_init_noise)
    return LearnedDatastore(dim, vocab_size, row_word)


@register_model("knnlm_ds_replacement", dataclass=DatastoreReplacementConfig)
class DatastoreReplacementLM(BaseFairseqModel):
    """A frozen base LM and a trainable head that replaces ``M·softmax(W_ds ⊗ h_ds)``."""

    def __init__(self, base: nn.Module, head: nn.Module, key_type: str) -> None:
        super().__init__()
        self.base = base
        self.head = head
        self.key_type = key_type
        self.capture = KeyCapture(base.decoder)

    @classmethod
    def build_model(cls, cfg, task):
        base = load_frozen_base(cfg.base_checkpoint, task.args.data if task.cfg is None else task.cfg.data)
        head = build_head(cfg, base, len(task.target_dictionary))
        trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
        logger.info(f"{cfg.ds_kind} head on {cfg.ds_key}: {trainable:,} trainable parameters; base frozen")
        return cls(base, head, str(cfg.ds_key))

    @property
    def supported_targets(self) -> set[str]:
        return {"future"}

    def train(self, mode: bool = True) -> "DatastoreReplacementLM":
        super().train(mode)
        self.base.eval()
        return self

    def features(self, src_tokens: Tensor, **kwargs) -> dict[str, Tensor]:
        """The frozen base's ``att`` and ``ffn`` representations of every position."""
        with torch.no_grad():
            self.capture.clear()
            self.base.decoder.extract_features(src_tokens, encoder_out=None)
            return self.capture.pop_all()

    def forward(self, src_tokens: Tensor, target: Tensor | None = None, **kwargs) -> tuple[Tensor, dict]:
        """(head log-probabilities ``[B, T, V]``, base representations); given ``target``, the head's
        log-probabilities of those words alone, ``[B, T]`` (what cross-entropy training needs; inside
        ``forward`` so that a distributed wrapper sees the head run)."""
        keys = self.features(src_tokens)
        h = keys[self.key_type]
        return (self.head(h) if target is None else self.head.target_log_probs(h, target)), keys

    def base_log_probs(self, keys: dict[str, Tensor]) -> Tensor:
        """The frozen base LM's log-probabilities for the same positions (from its ``ffn`` features)."""
        with torch.no_grad():
            return output_log_probs(self.base.decoder, keys["ffn"])

    def base_target_log_probs(self, keys: dict[str, Tensor], target: Tensor) -> Tensor:
        """``base_log_probs`` at ``target`` alone, ``[B, T]``."""
        with torch.no_grad():
            return output_target_log_probs(self.base.decoder, keys["ffn"], target)

    def get_normalized_probs(self, net_output, log_probs: bool, sample=None) -> Tensor:
        lp = net_output[0].float()
        return lp if log_probs else lp.exp()

    def head_dict_size(self) -> int:
        """Words the head predicts (the base LM's dictionary)."""
        return int(self.head.vocab_size) if hasattr(self.head, "vocab_size") else int(self.head.output_weight.shape[0])

    def max_positions(self):
        return self.base.max_positions()

    def state_dict(self, *args, **kwargs):
        state = super().state_dict(*args, **kwargs)
        prefix = kwargs.get("prefix", args[1] if len(args) > 1 else "")
        for name in [k for k in state if k.startswith(prefix + BASE_PREFIX)]:
            del state[name]
        return state

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        merged = dict(state_dict)
        for name, value in nn.Module.state_dict(self.base).items():
            merged.setdefault(BASE_PREFIX + name, value)
        return nn.Module.load_state_dict(self, merged, strict=strict)
