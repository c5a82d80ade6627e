"""``datastore build``: run a fairseq LM over a split and stream its kNN keys to disk.

Contexts are those of fairseq's eval_lm (see :mod:`knnlm.datastore.contexts`).
Keys are read with :class:`knnlm.models.capture.KeyCapture` hooks from
``decoder.extract_features``, so any fairseq transformer LM checkpoint works and
the output layer (softmax) is never computed. One forward pass fills the
datastores of all requested key types (``out/att``, ``out/ffn``).

Work is cut into chunks of whole batches; after each chunk the rows are synced
and ``progress.json`` records the next batch, so an interrupted build resumes
from the last complete chunk and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import MISSING
from tqdm import tqdm

from knnlm.datastore.contexts import ContextPlan, TokenStream, batch_inputs
from knnlm.datastore.meta import dictionary_fingerprint, sha256_files
from knnlm.datastore.sampling import sample_sorted, subsample_count
from knnlm.datastore.store import (
    KEY_DTYPE,
    VAL_DTYPE,
    ChunkWriter,
    Datastore,
    OutputState,
    finalize_meta,
    prepare_output,
)
from knnlm.errors import KnnlmError
from knnlm.models.capture import KEY_TYPES, KeyCapture, key_dim
from knnlm.models.loading import fairseq_hydra_compat

logger = logging.getLogger(__name__)


@dataclass
class DatastoreBuildConfig:
    """Options of ``knnlm datastore build`` (also the schema of its hydra app)."""

    checkpoint: str = MISSING
    data: str = MISSING
    out: str = MISSING
    split: str = "train"
    key_types: list[str] = field(default_factory=lambda: list(KEY_TYPES))
    # fairseq 0.12 eval_lm semantics: windows of at most tokens_per_sample tokens,
    # each carrying context_window tokens of left context; None: the checkpoint's
    # tokens_per_sample and half of it (kNN-LM on WIKI-103: 3072 / 1536).
    tokens_per_sample: Optional[int] = None
    context_window: Optional[int] = None
    max_tokens: int = 12288
    chunk_tokens: int = 1 << 20
    subsample: Optional[float] = None
    seed: int = 1
    num_shards: int = 1
    shard_id: int = 0
    device: str = "auto"
    fp16: Optional[bool] = None
    overwrite: bool = False


ChunkCallback = Callable[[int, int], None]


def resolve_device(device: str) -> torch.device:
    """``auto`` is the GPU where torch sees one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KnnlmError(f"--device {device} asked for a GPU but torch sees none; use --device cpu or auto")
    return dev


def load_language_model(checkpoint: str | os.PathLike, data: str | os.PathLike) -> tuple[torch.nn.Module, Any]:
    """Load a fairseq LM checkpoint with its task pointed at ``data`` (the data-bin with dict.txt)."""
    from fairseq import checkpoint_utils

    checkpoint, data = Path(checkpoint), Path(data)
    if not checkpoint.is_file():
        raise KnnlmError(f"checkpoint {checkpoint} does not exist; pass --checkpoint PATH/checkpoint_best.pt")
    if not (data / "dict.txt").is_file():
        raise KnnlmError(f"{data / 'dict.txt'} is missing; --data must be a fairseq data-bin folder")
    with fairseq_hydra_compat():
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(checkpoint)], arg_overrides={"data": str(data)}
        )
    return models[0], task


def load_split(data: str | os.PathLike, split: str, dictionary: Any) -> tuple[TokenStream, str]:
    """The split's token stream and a fingerprint of its binarized files."""
    from fairseq.data import data_utils

    prefix = Path(data) / split
    dataset = data_utils.load_indexed_dataset(str(prefix), dictionary)
    if dataset is None:
        raise KnnlmError(f"split {split!r} not found under {data} (no {prefix}.bin/.idx); check --split")
    files = [p for p in (prefix.with_suffix(".idx"), prefix.with_suffix(".bin")) if p.exists()]
    return TokenStream(dataset, dataset.sizes, dictionary.eos()), sha256_files(files)


@dataclass
class _Target:
    """One datastore being filled by the build."""

    key_type: str
    path: Path
    meta: dict[str, Any]
    state: OutputState
    writer: ChunkWriter | None = None


def build_datastore(cfg: DatastoreBuildConfig, on_chunk: ChunkCallback | None = None) -> list[Path]:
    """Build (or resume, or confirm complete) the datastores ``cfg.out/<key_type>``.

    ``on_chunk(next_batch, rows_done)`` is called after each committed chunk.
    Returns the datastore folders in the order of ``cfg.key_types``.
    """
    key_types = list(dict.fromkeys(cfg.key_types))
    unknown = [k for k in key_types if k not in KEY_TYPES]
    if unknown or not key_types:
        raise KnnlmError(f"--key-types must name some of {', '.join(KEY_TYPES)}; got {cfg.key_types}")
    device = resolve_device(cfg.device)
    fp16 = device.type == "cuda" if cfg.fp16 is None else bool(cfg.fp16)

    checkpoint_sha = sha256_files([cfg.checkpoint]) if Path(cfg.checkpoint).is_file() else ""
    model, task = load_language_model(cfg.checkpoint, cfg.data)
    dictionary = task.source_dictionary
    stream, data_sha = load_split(cfg.data, cfg.split, dictionary)

    tokens_per_sample = cfg.tokens_per_sample or int(task.cfg.tokens_per_sample)
    context_window = tokens_per_sample // 2 if cfg.context_window is None else cfg.context_window
    plan = ContextPlan(len(stream), tokens_per_sample, context_window, cfg.max_tokens)
    max_positions = model.max_positions()
    if isinstance(max_positions, int) and tokens_per_sample > max_positions:
        raise KnnlmError(
            f"--tokens-per-sample {tokens_per_sample} exceeds the {max_positions} positions of "
            f"{cfg.checkpoint}; use at most {max_positions}"
        )
    batches = plan.shard_batches(cfg.shard_id, cfg.num_shards)
    first_pos, end_pos = plan.batch_targets(batches[0])[0], plan.batch_targets(batches[-1])[1]

    positions: np.ndarray | None = None
    subsample = None
    first_row = first_pos  # row of this shard's first entry in the merged datastore
    if cfg.subsample is not None:
        kept = subsample_count(plan.num_tokens, cfg.subsample)
        everything = sample_sorted(plan.num_tokens, kept, cfg.seed)
        first_row = int(np.searchsorted(everything, first_pos))
        positions = everything[first_row : np.searchsorted(everything, end_pos)]
        subsample = {"ratio": cfg.subsample, "seed": cfg.seed, "kept": kept}
    num_rows = end_pos - first_pos if positions is None else len(positions)
    if num_rows == 0:
        raise KnnlmError(f"shard {cfg.shard_id} of {cfg.num_shards} keeps no token; use fewer shards")

    compute = {
        "device": device.type,
        "dtype": "float16" if fp16 else "float32",
        "windows_per_batch": plan.windows_per_batch,
        "max_tokens": cfg.max_tokens,
        "torch": torch.__version__,
    }
    common = {
        "num_keys": num_rows,
        "key_dtype": KEY_DTYPE,
        "val_dtype": VAL_DTYPE,
        "has_positions": positions is not None,
        "first_position": first_pos if positions is None else 0,
        "source": {
            "checkpoint_sha256": checkpoint_sha,
            "dictionary_sha256": dictionary_fingerprint(dictionary),
            "dictionary_size": len(dictionary),
            "data_sha256": data_sha,
            "split": cfg.split,
            "split_tokens": plan.num_tokens,
        },
        "context": plan.settings(),
        "subsample": subsample,
        "shard": {
            "shard_id": cfg.shard_id,
            "num_shards": cfg.num_shards,
            "first_position": first_pos,
            "end_position": end_pos,
            "first_row": first_row,
        },
        "compute": compute,
        "paths": {"checkpoint": str(Path(cfg.checkpoint).resolve()), "data": str(Path(cfg.data).resolve())},
    }
    targets = []
    for kt in key_types:
        meta = finalize_meta({**common, "key_type": kt, "key_dim": key_dim(model.decoder, kt)})
        resume_spec = _resume_spec(meta)
        path = Path(cfg.out) / kt
        targets.append(_Target(kt, path, meta, prepare_output(path, meta, resume_spec, cfg.overwrite)))
    pending = [t for t in targets if t.state.status != "complete"]
    for t in targets:
        if t.state.status == "complete":
            logger.info("%s is complete already (datastore %s)", t.path, t.meta["datastore_id"][:12])
    if pending:
        _run(
            model,
            plan,
            stream,
            batches,
            positions,
            (first_pos, end_pos),
            pending,
            device,
            fp16,
            dictionary.pad(),
            cfg.chunk_tokens,
            on_chunk,
        )
    for t in targets:
        Datastore.open(t.path)
    return [t.path for t in targets]


def _resume_spec(meta: dict[str, Any]) -> dict[str, Any]:
    """What a resumed build must share with the interrupted one to write the same bytes."""
    compute = meta["compute"]
    return {
        "datastore_id": meta["datastore_id"],
        "device": compute["device"],
        "dtype": compute["dtype"],
        "windows_per_batch": compute["windows_per_batch"],
    }


def _run(
    model: torch.nn.Module,
    plan: ContextPlan,
    stream: TokenStream,
    batches: range,
    positions: np.ndarray | None,
    target_range: tuple[int, int],
    targets: list[_Target],
    device: torch.device,
    fp16: bool,
    pad: int,
    chunk_tokens: int,
    on_chunk: ChunkCallback | None,
) -> None:
    model.eval()
    model.to(device)
    if fp16:
        model.half()
    own_capture = not isinstance(getattr(model, "key_capture", None), KeyCapture)
    capture = KeyCapture(model.decoder) if own_capture else model.key_capture
    first_pos, end_pos = target_range
    batches_per_chunk = max(1, chunk_tokens // (plan.windows_per_batch * plan.block))
    start = min(t.state.next_unit if t.state.status == "resume" else batches.start for t in targets)
    start = max(start, batches.start)
    for t in targets:
        t.writer = ChunkWriter(t.path, t.meta["num_keys"], t.meta["key_dim"], t.state, positions)
    done_tokens = plan.batch_targets(start)[0] - first_pos if start < batches.stop else end_pos - first_pos
    bar = tqdm(
        total=end_pos - first_pos,
        initial=done_tokens,
        unit="tok",
        unit_scale=True,
        desc="datastore",
        disable=None,
    )
    try:
        for chunk_start in range(start, batches.stop, batches_per_chunk):
            chunk_end = min(chunk_start + batches_per_chunk, batches.stop)
            for b in range(chunk_start, chunk_end):
                rows, row0, vals, keys = _batch(
                    model,
                    capture,
                    plan,
                    stream,
                    b,
                    positions,
                    first_pos,
                    [t.key_type for t in targets],
                    pad,
                    device,
                )
                for t in targets:
                    if t.state.status != "resume" or b >= t.state.next_unit:
                        t.writer.write(row0, keys[t.key_type], vals)
                s, e = plan.batch_targets(b)
                bar.update(e - s)
                rows_done = row0 + rows
            for t in targets:
                t.writer.commit(_resume_spec(t.meta), chunk_end, rows_done)
            if on_chunk is not None:
                on_chunk(chunk_end, rows_done)
        for t in targets:
            t.writer.finish(t.meta)
    finally:
        bar.close()
        for t in targets:
            if t.writer is not None:
                t.writer.close()
        if own_capture:
            capture.remove()
        else:
            capture.clear()


@torch.inference_mode()
def _batch(
    model: torch.nn.Module,
    capture: KeyCapture,
    plan: ContextPlan,
    stream: TokenStream,
    b: int,
    positions: np.ndarray | None,
    first_pos: int,
    key_types: list[str],
    pad: int,
    device: torch.device,
) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]]:
    """Forward batch ``b``; returns (rows, first row, vals, {key_type: fp16 keys}) of its kept targets."""
    tokens, rows, cols = batch_inputs(plan, stream, b, pad)
    flat = rows * tokens.shape[1] + cols
    s_b, e_b = plan.batch_targets(b)
    vals = stream.targets(s_b, e_b)
    if positions is None:
        row0 = s_b - first_pos
    else:
        lo, hi = np.searchsorted(positions, s_b), np.searchsorted(positions, e_b)
        keep = positions[lo:hi] - s_b
        flat, vals, row0 = flat[keep], vals[keep], int(lo)
    capture.clear()
    model.decoder.extract_features(torch.from_numpy(tokens).to(device), None)
    index = torch.from_numpy(flat).to(device)
    keys = {}
    for kt in key_types:
        hidden = capture.pop(kt)
        keys[kt] = hidden.reshape(-1, hidden.shape[-1]).index_select(0, index).to(torch.float16).cpu().numpy()
    capture.clear()
    return len(flat), row0, vals, keys


def build_summary(paths: list[Path]) -> str:
    """One line per built datastore, for the command line."""
    lines = []
    for path in paths:
        store = Datastore.open(path)
        size = store.keys.nbytes + store.vals.nbytes
        lines.append(
            f"{path}: {store.num_keys:,} x {store.key_dim} {store.key_type} keys "
            f"({size / 2**20:.1f} MiB), id {store.datastore_id[:12]}"
        )
    return "\n".join(lines)
