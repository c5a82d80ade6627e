"""``datastore build``: run a base LM over a split and stream its kNN keys to disk.

Contexts are those of fairseq's eval_lm (see :mod:`knnlm.models.windows`).
The base LM is a fairseq checkpoint or a Hugging Face causal LM
(:mod:`knnlm.models.base_lm`); keys are read with forward hooks (for fairseq
:class:`knnlm.models.capture.KeyCapture` on ``decoder.extract_features``), so the
output layer (softmax) is never computed. One forward pass fills the
datastores of all requested key types (``out/att``, ``out/ffn``).

Work is cut into chunks of whole batches; after each chunk the rows are synced
and ``progress.json`` records the next batch, so an interrupted build resumes
from the last complete chunk and produces the same bytes as an uninterrupted one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
from omegaconf import MISSING
from tqdm import tqdm

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
from knnlm.errors import KnnlmError, require_at_least
from knnlm.io import WriterLock
from knnlm.models.base_lm import BaseLM, Capture
from knnlm.models.capture import KEY_TYPES
from knnlm.models.devices import resolve_device
from knnlm.models.factory import BASE_MODEL_HELP, open_base_lm
from knnlm.models.fairseq_lm import load_language_model, load_split
from knnlm.models.windows import ContextPlan, TokenStream, batch_inputs

__all__ = ["DatastoreBuildConfig", "build_datastore", "build_summary", "load_language_model", "load_split"]

logger = logging.getLogger(__name__)


@dataclass
class DatastoreBuildConfig:
    """Options of ``knnlm datastore build`` (also the schema of its hydra app; the CLI is generated from it)."""

    checkpoint: Optional[str] = field(default=None, metadata={"help": BASE_MODEL_HELP["checkpoint"]})
    hf_model: Optional[str] = field(default=None, metadata={"help": BASE_MODEL_HELP["hf_model"]})
    hf_revision: Optional[str] = field(default=None, metadata={"help": BASE_MODEL_HELP["hf_revision"]})
    data: str = field(default=MISSING, metadata={"help": BASE_MODEL_HELP["data"]})
    out: str = field(default=MISSING, metadata={"help": "output folder; datastores go to OUT/att and OUT/ffn"})
    split: str = field(default="train", metadata={"help": "split whose tokens become the datastore"})
    key_types: list[str] = field(
        default_factory=lambda: list(KEY_TYPES),
        metadata={"help": "comma-separated subset of att,ffn (default: both, one forward pass)"},
    )
    # fairseq 0.12 eval_lm semantics: windows of at most tokens_per_sample tokens,
    # each carrying context_window tokens of left context; None: the checkpoint's
    # tokens_per_sample and half of it (kNN-LM on WIKI-103: 3072 / 1536).
    tokens_per_sample: Optional[int] = field(
        default=None, metadata={"help": "longest window, as fairseq 0.12 eval_lm (default: the checkpoint's)"}
    )
    context_window: Optional[int] = field(
        default=None, metadata={"help": "left context carried into each window (default: tokens-per-sample / 2)"}
    )
    max_tokens: int = field(
        default=12288, metadata={"help": "tokens per batch; windows per batch = max-tokens // tokens-per-sample"}
    )
    chunk_tokens: int = field(default=1 << 20, metadata={"help": "target tokens between commits (resume granularity)"})
    subsample: Optional[float] = field(
        default=None, metadata={"help": "keep a uniform random RATIO of the tokens (with --seed)"}
    )
    seed: int = field(default=1, metadata={"help": "seed of --subsample"})
    num_shards: int = field(default=1, metadata={"help": "build shard --shard-id of this many (merge them after)"})
    shard_id: int = field(default=0, metadata={"help": "which shard this run builds, in [0, --num-shards)"})
    device: str = field(default="auto", metadata={"help": "auto (GPU if present), cpu, cuda, cuda:N"})
    fp16: Optional[bool] = field(default=None, metadata={"help": "forward in fp16 (default: on GPU)"})
    overwrite: bool = field(
        default=False, metadata={"help": "replace a datastore built with other settings instead of refusing"}
    )


ChunkCallback = Callable[[int, int], None]


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

    Holds the output's :class:`~knnlm.io.WriterLock` meanwhile: a second writer is refused.
    """
    for option, value, low in (("--tokens-per-sample", cfg.tokens_per_sample, 1), ("--max-tokens", cfg.max_tokens, 1),
                               ("--context-window", cfg.context_window, 0), ("--chunk-tokens", cfg.chunk_tokens, 1),
                               ("--num-shards", cfg.num_shards, 1), ("--shard-id", cfg.shard_id, 0)):
        require_at_least(option, value, low)
    resolve_device(cfg.device)
    with WriterLock.for_folder(cfg.out, f"datastore folder {cfg.out}"):
        return _build_datastore(cfg, on_chunk)


def _build_datastore(cfg: DatastoreBuildConfig, on_chunk: ChunkCallback | None = None) -> list[Path]:
    """:func:`build_datastore` under its lock."""
    key_types = list(dict.fromkeys(cfg.key_types))
    unknown = [k for k in key_types if k not in KEY_TYPES]
    if unknown or not key_types:
        raise KnnlmError(f"--key-types must name some of {', '.join(KEY_TYPES)}; got {cfg.key_types}")
    device = resolve_device(cfg.device)
    fp16 = device.type == "cuda" if cfg.fp16 is None else bool(cfg.fp16)

    lm = open_base_lm(cfg.checkpoint, cfg.hf_model, cfg.data, cfg.hf_revision)
    split_tokens = lm.load_split(cfg.data, cfg.split)
    stream = split_tokens.stream
    plan = make_plan(lm, len(stream), cfg.tokens_per_sample, cfg.context_window, cfg.max_tokens)
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
            **lm.source(),
            "data_sha256": split_tokens.data_sha256,
            "split": cfg.split,
            "split_tokens": plan.num_tokens,
            **({"units": split_tokens.units} if split_tokens.units else {}),
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
        "paths": {**lm.paths(), "data": str(Path(cfg.data).resolve())},
    }
    targets = []
    for kt in key_types:
        meta = finalize_meta({**common, "key_type": kt, "key_dim": lm.key_dim(kt)})
        resume_spec = _resume_spec(meta)
        path = Path(cfg.out) / kt
        targets.append(_Target(kt, path, meta, prepare_output(path, meta, resume_spec, cfg.overwrite)))
    pending = [t for t in targets if t.state.status != "complete"]
    for t in targets:
        if t.state.status == "complete":
            logger.info("%s is complete already (datastore %s)", t.path, t.meta["datastore_id"][:12])
    if pending:
        _run(
            lm,
            plan,
            stream,
            batches,
            positions,
            (first_pos, end_pos),
            pending,
            device,
            fp16,
            cfg.chunk_tokens,
            on_chunk,
        )
    for t in targets:
        Datastore.open(t.path)
    return [t.path for t in targets]


def make_plan(
    lm: BaseLM, num_tokens: int, tokens_per_sample: int | None, context_window: int | None, max_tokens: int
) -> ContextPlan:
    """The windows of a split: ``tokens_per_sample`` (default: the model's) with ``context_window``
    tokens of carried context (default: half), i.e. a sliding window with stride T − C."""
    tokens_per_sample = lm.default_tokens_per_sample if tokens_per_sample is None else tokens_per_sample
    context_window = tokens_per_sample // 2 if context_window is None else context_window
    if lm.max_positions is not None and tokens_per_sample > lm.max_positions:
        raise KnnlmError(
            f"--tokens-per-sample {tokens_per_sample} exceeds the {lm.max_positions} positions of "
            f"{lm.describe()}; use at most {lm.max_positions}"
        )
    return ContextPlan(num_tokens, tokens_per_sample, context_window, max_tokens)


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
    lm: BaseLM,
    plan: ContextPlan,
    stream: TokenStream,
    batches: range,
    positions: np.ndarray | None,
    target_range: tuple[int, int],
    targets: list[_Target],
    device: torch.device,
    fp16: bool,
    chunk_tokens: int,
    on_chunk: ChunkCallback | None,
) -> None:
    lm.prepare(device, fp16)
    capture = lm.capture()
    first_pos, end_pos = target_range
    batches_per_chunk = max(1, chunk_tokens // (plan.windows_per_batch * plan.block))
    start = min(t.state.next_unit if t.state.status == "resume" else batches.start for t in targets)
    start = max(start, batches.start)
    for t in targets:
        t.writer = ChunkWriter(
            t.path, t.meta["num_keys"], t.meta["key_dim"], t.state, _resume_spec(t.meta), positions
        )
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
                    lm,
                    capture,
                    plan,
                    stream,
                    b,
                    positions,
                    first_pos,
                    [t.key_type for t in targets],
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
        capture.remove()


@torch.inference_mode()
def _batch(
    lm: BaseLM,
    capture: Capture,
    plan: ContextPlan,
    stream: TokenStream,
    b: int,
    positions: np.ndarray | None,
    first_pos: int,
    key_types: list[str],
    device: torch.device,
) -> tuple[int, int, np.ndarray, dict[str, np.ndarray]]:
    """Forward batch ``b``; returns (rows, first row, vals, {key_type: fp16 keys}) of its kept targets."""
    tokens, rows, cols = batch_inputs(plan, stream, b, lm.pad)
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
    lm.features(torch.from_numpy(tokens).to(device))
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
