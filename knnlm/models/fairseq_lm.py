"""A fairseq LM checkpoint as a :class:`~knnlm.models.base_lm.BaseLM`: keys from hooks, data from a data-bin."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from knnlm.errors import KnnlmError
from knnlm.io import dictionary_fingerprint, sha256_files
from knnlm.models.base_lm import SplitTokens
from knnlm.models.capture import KeyCapture, key_dim
from knnlm.models.loading import fairseq_hydra_compat
from knnlm.models.windows import TokenStream


def load_language_model(checkpoint: str | os.PathLike, data: str | os.PathLike) -> tuple[nn.Module, Any]:
    """Load a fairseq LM checkpoint with its task pointed at ``data`` (the data-bin with dict.txt).

    The dictionary must be the one the checkpoint was trained with: where the
    checkpoint's own data-bin is still on disk, the two ``dict.txt`` must hold the
    same symbols in the same order (same size is not enough: ids would mean other
    words); a dictionary of another size is one clear error, not a state-dict traceback.
    """
    from fairseq import checkpoint_utils

    checkpoint, data = Path(checkpoint), Path(data)
    if not checkpoint.is_file():
        raise KnnlmError(f"checkpoint {checkpoint} does not exist; pass --checkpoint PATH/checkpoint_best.pt")
    if not (data / "dict.txt").is_file():
        raise KnnlmError(f"{data / 'dict.txt'} is missing; --data must be a fairseq data-bin folder")
    with fairseq_hydra_compat():
        try:
            state = checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))
        except Exception as err:  # torch.load raises many types for a file that is not a checkpoint
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise KnnlmError(f"{checkpoint} is not a readable fairseq checkpoint ({first[:200]})") from None
        _check_training_dictionary(checkpoint, state, data)
        _point_task_at(state, data)
        try:
            models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)], state=state)
        except RuntimeError as err:
            if "size mismatch" not in str(err):
                raise
            raise KnnlmError(
                f"{checkpoint} does not fit {data / 'dict.txt'} ({_count_symbols(data)} symbols): its embeddings "
                "have another vocabulary size; pass the data-bin the checkpoint was trained with"
            ) from None
    return models[0], task


def _point_task_at(state: dict[str, Any], data: Path) -> None:
    """What fairseq's ``arg_overrides={"data": ...}`` does, once the recorded path has been read."""
    from fairseq.dataclass.utils import overwrite_args_by_name

    if state.get("args") is not None:
        state["args"].data = str(data)
    if state.get("cfg") is not None:
        overwrite_args_by_name(state["cfg"], {"data": str(data)})


def _count_symbols(data: Path) -> int:
    with open(data / "dict.txt", encoding="utf-8") as f:
        return 4 + sum(1 for _ in f)  # fairseq's <s>, <pad>, </s>, <unk> come first


def _check_training_dictionary(checkpoint: Path, state: dict[str, Any], data: Path) -> None:
    """Refuse ``data`` when the checkpoint's own training data-bin is on disk with another dict.txt."""
    cfg = state.get("cfg")
    trained_on = None
    if cfg is not None and cfg.get("task") is not None:
        trained_on = cfg["task"].get("data")
    elif state.get("args") is not None:
        trained_on = getattr(state["args"], "data", None)
    if not trained_on:
        return
    own = Path(str(trained_on).split(":")[0]) / "dict.txt"
    given = data / "dict.txt"
    if not own.is_file() or own.resolve() == given.resolve():
        return
    def symbols(path: Path) -> list[str]:  # counts left out: they do not change what an id means
        return [line.split(" ")[0] for line in path.read_text(encoding="utf-8").splitlines()]

    if symbols(own) != symbols(given):
        raise KnnlmError(
            f"{given} is not the dictionary {checkpoint} was trained with ({own}): the symbols differ, so ids "
            "would mean other words; pass --data of the checkpoint's own data-bin"
        )


def load_split(data: str | os.PathLike, split: str, dictionary: Any) -> tuple[TokenStream, str]:
    """The split's token stream and a fingerprint of its binarized files."""
    from fairseq.data import data_utils

    prefix = Path(data) / split
    dataset = data_utils.load_indexed_dataset(str(prefix), dictionary)
    if dataset is None:
        raise KnnlmError(f"split {split!r} not found under {data} (no {prefix}.bin/.idx); check --split")
    files = [p for p in (prefix.with_suffix(".idx"), prefix.with_suffix(".bin")) if p.exists()]
    return TokenStream(dataset, dataset.sizes, dictionary.eos()), sha256_files(files)


class FairseqLM:
    """A fairseq transformer LM and the data-bin whose dictionary it was trained with."""

    def __init__(self, model: nn.Module, task: Any, checkpoint: str, data: str) -> None:
        self.model = model
        self.task = task
        self.checkpoint = checkpoint
        self.data = data
        self.dictionary = task.source_dictionary
        self.pad = self.dictionary.pad()
        self.vocab_size = len(self.dictionary)
        positions = model.max_positions()
        self.max_positions = positions if isinstance(positions, int) else None
        self._checkpoint_sha: str | None = None

    @classmethod
    def load(cls, checkpoint: str, data: str) -> FairseqLM:
        model, task = load_language_model(checkpoint, data)
        return cls(model, task, checkpoint, data)

    @property
    def default_tokens_per_sample(self) -> int:
        """The checkpoint task's ``tokens_per_sample`` (read only when no window length is given)."""
        cfg = self.task.cfg if getattr(self.task, "cfg", None) is not None else self.task.args
        return int(cfg.tokens_per_sample)

    def describe(self) -> str:
        return str(self.checkpoint)

    def source(self) -> dict[str, Any]:
        if self._checkpoint_sha is None:
            self._checkpoint_sha = sha256_files([self.checkpoint])
        return {
            "checkpoint_sha256": self._checkpoint_sha,
            "dictionary_sha256": dictionary_fingerprint(self.dictionary),
            "dictionary_size": len(self.dictionary),
        }

    def paths(self) -> dict[str, str]:
        return {"checkpoint": str(Path(self.checkpoint).resolve())}

    def key_dim(self, key_type: str) -> int:
        return key_dim(self.model.decoder, key_type)

    def load_split(self, data: str | os.PathLike, split: str, words: bool = False) -> SplitTokens:
        stream, data_sha = load_split(data, split, self.dictionary)
        return SplitTokens(stream, data_sha)  # tokens are the data-bin's symbols

    def prepare(self, device: torch.device, fp16: bool) -> None:
        self.model.eval()
        self.model.to(device)
        if fp16:
            self.model.half()

    def capture(self) -> KeyCapture:
        # always hooks of its own: a model's built-in capture is emptied by the model's forward
        return KeyCapture(self.model.decoder)

    def features(self, tokens: Tensor) -> None:
        self.model.decoder.extract_features(tokens, None)

    def target_logprobs(self, tokens: Tensor, rows: Tensor, cols: Tensor, targets: Tensor) -> Tensor:
        output, _extra = self.model(tokens)
        return output_logprobs(self.model.decoder, output[rows, cols], targets)


def output_logprobs(decoder: nn.Module, output: Tensor, targets: Tensor) -> Tensor:
    """fp32 log p(``targets``) [N] from the decoder's ``output`` [N, ·] at the scored positions only.

    ``output`` is what the decoder's forward returns: vocabulary logits, or the
    features an adaptive softmax consumes. The adaptive softmax is evaluated for the
    targets alone: the head for every row, each tail cluster only for the rows whose
    target lies in it — the same values as fairseq's full ``get_normalized_probs``
    without the [N, V] array it builds (a ~33K vocabulary makes that the dump's main cost).
    """
    adaptive = getattr(decoder, "adaptive_softmax", None)
    if adaptive is None:
        return torch.log_softmax(output.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return adaptive_target_logprobs(adaptive, output, targets)


def adaptive_target_logprobs(adaptive: nn.Module, features: Tensor, targets: Tensor) -> Tensor:
    """log p(``targets``) of fairseq's ``AdaptiveSoftmax`` (head, then the target's tail cluster)."""
    cutoff = adaptive.cutoff  # [c0, c1, ..., V]: words below c0 in the head, cluster i is [c_i, c_{i+1})
    head = torch.log_softmax(adaptive.head(features).float(), dim=-1)
    in_head = targets < cutoff[0]
    out = torch.empty(len(targets), dtype=torch.float32, device=features.device)
    out[in_head] = head[in_head, targets[in_head]]
    for i, tail in enumerate(adaptive.tail):
        rows = torch.nonzero((targets >= cutoff[i]) & (targets < cutoff[i + 1]), as_tuple=True)[0]
        if len(rows) == 0:
            continue
        tail_lp = torch.log_softmax(tail(features[rows]).float(), dim=-1)
        out[rows] = head[rows, cutoff[0] + i] + tail_lp.gather(-1, (targets[rows] - cutoff[i])[:, None]).squeeze(-1)
    return out
