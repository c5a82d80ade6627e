"""Helpers of the criterion tests: a small dictionary, tiny LMs built in-process, LM batches.

Models are built directly (no fairseq-train) with dropout 0 so that two forwards of
the same batch give the same numbers; dtypes are always set explicitly because other
test modules change torch's default dtype.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import torch
from fairseq.data import Dictionary
from fairseq.models.transformer_lm import TransformerLanguageModel, base_lm_architecture
from torch import Tensor, nn

import knnlm  # noqa: F401  (registers the criteria)
from knnlm.models.transformer_lm import KnnTransformerLanguageModel, knnlm_transformer_lm_tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


class LmTask:
    """The part of a fairseq language-modeling task that models and criteria read."""

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = self.source_dictionary = self.target_dictionary = dictionary


def make_task(num_words: int = 40) -> LmTask:
    dictionary = Dictionary()
    for i in range(num_words):
        dictionary.add_symbol(f"w{i}")
    return LmTask(dictionary)


def build_lm(
    task: LmTask,
    kind: str = "knnlm",
    dtype: torch.dtype = torch.float64,
    adaptive_cutoff: str | None = None,
    seed: int = 0,
) -> nn.Module:
    """A 2-layer 16-d LM in train mode without dropout.

    ``kind="knnlm"``: ``knnlm_transformer_lm_tiny`` dims (keys in ``extra``); ``"stock"``: fairseq's
    ``transformer_lm`` (keys only through hooks, 24-d output projection).
    """
    torch.manual_seed(seed)
    args = argparse.Namespace(
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        tokens_per_sample=32,
        max_target_positions=32,
        decoder_layers=2,
        decoder_embed_dim=16,
        decoder_ffn_embed_dim=32,
        decoder_attention_heads=2,
        adaptive_softmax_cutoff=adaptive_cutoff,
        adaptive_softmax_dropout=0.0,
    )
    if adaptive_cutoff is not None:
        args.share_decoder_input_output_embed = False
    if kind == "knnlm":
        knnlm_transformer_lm_tiny(args)
        model = KnnTransformerLanguageModel.build_model(args, task)
    else:
        args.decoder_output_dim = 24  # as stock fairseq does by default: a projection before the softmax
        args.decoder_input_dim = 16
        base_lm_architecture(args)
        model = TransformerLanguageModel.build_model(args, task)
    return model.to(dtype).train()


def make_sample(task: LmTask, batch: int = 3, length: int = 8, pad_rows: int = 1, seed: int = 0) -> dict:
    """An LM batch; the last ``pad_rows`` rows end in padding (source and target)."""
    gen = torch.Generator().manual_seed(seed)
    dictionary = task.target_dictionary
    tokens = torch.randint(dictionary.nspecial, len(dictionary), (batch, length + 1), generator=gen)
    source, target = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    lengths = torch.full((batch,), length)
    for row in range(batch - pad_rows, batch):
        cut = length // 2 + row % 2
        source[row, cut:] = dictionary.pad()
        target[row, cut:] = dictionary.pad()
        lengths[row] = cut
    return {
        "id": torch.arange(batch),
        "net_input": {"src_tokens": source, "src_lengths": lengths},
        "target": target,
        "ntokens": int(lengths.sum()),
        "nsentences": batch,
    }


def duplicate(sample: dict) -> dict:
    """The same batch twice (rows stacked)."""
    return {
        "id": torch.cat([sample["id"], sample["id"]]),
        "net_input": {k: torch.cat([v, v]) for k, v in sample["net_input"].items()},
        "target": torch.cat([sample["target"], sample["target"]]),
        "ntokens": 2 * sample["ntokens"],
        "nsentences": 2 * sample["nsentences"],
    }


@contextmanager
def retained_keys(model: nn.Module, key: str) -> Iterator[list[Tensor]]:
    """Collect the ``key`` tensor of each forward of a knnlm model, with ``retain_grad``."""
    seen: list[Tensor] = []

    def hook(module: nn.Module, inputs: tuple, output: tuple) -> None:
        tensor = output[1][key]
        if tensor.requires_grad:
            tensor.retain_grad()
        seen.append(tensor)

    handle = model.register_forward_hook(hook)
    try:
        yield seen
    finally:
        handle.remove()


def key_layer_norm(model: nn.Module, key: str) -> nn.LayerNorm:
    """The LayerNorm whose output is the key in these pre-norm models (``att``/``ffn``)."""
    return model.decoder.layers[-1].final_layer_norm if key == "att" else model.decoder.layer_norm


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
