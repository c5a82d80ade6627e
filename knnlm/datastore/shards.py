"""Scale-out: sharded datastore builds, their merge, and serving sharded or on-disk indexes.

The path, with existing engines only:

1. **Build in shards.** ``knnlm datastore build --num-shards S --shard-id i`` on S
   workers (one GPU each, or one machine each): shard i takes a contiguous range
   of whole batches of the split (:meth:`ContextPlan.shard_batches`), so every
   key is computed exactly as in a one-shot build.
2. **Merge** (:func:`merge_datastores`, ``knnlm datastore merge``): the shards
   concatenated chunk by chunk into one datastore, byte-identical to — and with
   the same id as — a one-shot build with the same batch size.
3. **Index in shards.** Train once (``knnlm index train``, a sample of the merged
   or of one shard datastore), then each worker adds its shard:
   ``knnlm index build --datastore shard_i --trained T``. Serve them either
   * with faiss's ``IndexShards`` (:func:`open_index_shards`): each shard
     searched, results merged, ids shifted to the merged datastore's rows; or
   * merged into one index with on-disk inverted lists
     (``faiss.contrib.ondisk.merge_ondisk``, :func:`merge_index_ondisk`), which
     memory-maps lists larger than RAM.
   A single large index is spread over GPUs by :meth:`KnnIndex.load` with
   ``device="cuda"`` (faiss's ``IndexReplicas``, or ``IndexShards`` with
   ``gpu_shard=True``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from faiss.contrib.ondisk import merge_ondisk
from tqdm import tqdm

from knnlm.datastore.index import KnnIndex, check_index_meta, read_index_meta, write_index_file
from knnlm.datastore.store import (
    NON_IDENTITY_FIELDS,
    ChunkWriter,
    Datastore,
    finalize_meta,
    prepare_output,
)
from knnlm.errors import KnnlmError

logger = logging.getLogger(__name__)

_FORMAT_FIELDS = ("format", "format_version")
_PER_SHARD_FIELDS = ("num_keys", "first_position", "shard")


def _shared_fields(meta: dict[str, Any]) -> dict[str, Any]:
    drop = set(NON_IDENTITY_FIELDS) | set(_FORMAT_FIELDS) | set(_PER_SHARD_FIELDS)
    return {k: v for k, v in meta.items() if k not in drop}


def merge_datastores(
    shard_paths: Sequence[str | os.PathLike],
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    chunk_rows: int = 1 << 18,
) -> Path:
    """Concatenate the shard datastores of one sharded build into ``out``.

    All shards of the build must be given, complete, in any order. The result is
    what a one-shot build writes (same bytes, same ``datastore_id``); its
    metadata lists the shard ids under ``merged_from`` for
    :func:`open_index_shards`. Resumes an interrupted merge.
    """
    shards = [Datastore.open(p) for p in shard_paths]
    if not shards:
        raise KnnlmError("give the shard datastores to merge")
    shards.sort(key=lambda s: s.meta["shard"]["shard_id"])
    first = shards[0].meta
    total = first["shard"]["num_shards"]
    ids = [s.meta["shard"]["shard_id"] for s in shards]
    if ids != list(range(total)):
        raise KnnlmError(f"a build of {total} shards needs shards 0..{total - 1}; got {ids}")
    for s in shards[1:]:
        if _shared_fields(s.meta) != _shared_fields(first):
            raise KnnlmError(
                f"{s.path} comes from another build than {shards[0].path} "
                f"(other checkpoint, data, key type or settings); merge shards of one build"
            )
    for a, b in zip(shards, shards[1:], strict=False):
        sa, sb = a.meta["shard"], b.meta["shard"]
        if sa["end_position"] != sb["first_position"] or sa["first_row"] + a.num_keys != sb["first_row"]:
            raise KnnlmError(
                f"{a.path} and {b.path} do not cover adjacent token ranges; rebuild the shards "
                f"with the same --max-tokens"
            )
    split_tokens = first["source"]["split_tokens"]
    end = shards[-1].meta["shard"]["end_position"]
    meta = {k: v for k, v in first.items() if k not in NON_IDENTITY_FIELDS and k not in _FORMAT_FIELDS}
    meta.update(
        num_keys=sum(s.num_keys for s in shards),
        first_position=0,
        shard={"shard_id": 0, "num_shards": 1, "first_position": 0, "end_position": end, "first_row": 0},
        compute=first.get("compute"),
        paths=first.get("paths"),
        merged_from=[{"datastore_id": s.datastore_id, "num_keys": s.num_keys, "path": str(s.path)} for s in shards],
    )
    if end != split_tokens or first["shard"]["first_position"] != 0:
        raise KnnlmError(
            f"the shards cover [{first['shard']['first_position']}, {end}) of a split of "
            f"{split_tokens} tokens; build the missing shards"
        )
    meta = finalize_meta(meta)
    out = Path(out)
    spec = {"datastore_id": meta["datastore_id"], "merged_from": [s.datastore_id for s in shards]}
    state = prepare_output(out, meta, spec, overwrite)
    if state.status == "complete":
        return out
    positions = np.concatenate([s.positions() for s in shards]) if meta["has_positions"] else None
    offsets = np.cumsum([0] + [s.num_keys for s in shards])
    start = state.next_unit if state.status == "resume" else 0
    with (
        ChunkWriter(out, meta["num_keys"], meta["key_dim"], state, spec, positions) as writer,
        tqdm(total=meta["num_keys"], initial=start, unit="key", unit_scale=True, desc="merge", disable=None) as bar,
    ):
        for row in range(start, meta["num_keys"], chunk_rows):
            stop = min(row + chunk_rows, meta["num_keys"])
            for i, s in enumerate(shards):
                lo, hi = max(row, offsets[i]), min(stop, offsets[i + 1])
                if lo < hi:
                    writer.write(
                        lo,
                        s.keys[lo - offsets[i] : hi - offsets[i]],
                        s.vals[lo - offsets[i] : hi - offsets[i]],
                    )
            writer.commit(spec, stop, stop)
            bar.update(stop - row)
        writer.finish(meta)
    Datastore.open(out)
    return out


def _shard_layout(datastore: Datastore) -> list[dict[str, Any]]:
    layout = datastore.meta.get("merged_from")
    if not layout:
        raise KnnlmError(
            f"{datastore.path} is not a merge of shard datastores (no merged_from in its "
            f"meta.json); shard indexes can only serve a merged datastore"
        )
    return layout


class _ShardDatastore:
    """Stands in for a shard's datastore when checking a shard index's sidecar."""

    def __init__(self, entry: dict[str, Any], key_dim: int) -> None:
        self.datastore_id = entry["datastore_id"]
        self.num_keys = entry["num_keys"]
        self.key_dim = key_dim
        self.path = entry.get("path", "?")


def _check_shard_indexes(index_paths: Sequence[str | os.PathLike], datastore: Datastore) -> list[dict[str, Any]]:
    """Sidecars of the shard indexes, checked against the shards ``datastore`` was merged from."""
    layout = _shard_layout(datastore)
    if len(index_paths) != len(layout):
        raise KnnlmError(f"{datastore.path} merges {len(layout)} shards but {len(index_paths)} indexes were given")
    metas = []
    first_row = 0
    for path, entry in zip(index_paths, layout, strict=True):
        meta = read_index_meta(Path(path))
        check_index_meta(meta, _ShardDatastore(entry, datastore.key_dim), str(path))  # type: ignore[arg-type]
        if meta.get("id_offset", 0) not in (0, first_row):
            raise KnnlmError(
                f"{path} stores ids from {meta['id_offset']}, not from row {first_row} of "
                f"{datastore.path}; rebuild it from its shard datastore"
            )
        first_row += entry["num_keys"]
        metas.append(meta)
    kinds = {(m["factory"], m["metric"]) for m in metas}
    if len(kinds) != 1:
        raise KnnlmError(f"shard indexes must share factory and metric; got {sorted(kinds)}")
    return metas


def open_index_shards(
    index_paths: Sequence[str | os.PathLike],
    datastore: Datastore,
    *,
    nprobe: int | None = None,
    threaded: bool = True,
) -> KnnIndex:
    """Serve per-shard indexes as one index over the merged ``datastore`` with faiss ``IndexShards``.

    ``index_paths`` are in shard order; each must have been built from the
    corresponding shard datastore. Returned ids are rows of ``datastore``:
    IVF shards store them already (see :func:`~knnlm.datastore.index.id_offset_for`),
    other shards are numbered successively by ``IndexShards``.
    """
    metas = _check_shard_indexes(index_paths, datastore)
    global_ids = any(m.get("id_offset", 0) for m in metas)
    shards = faiss.IndexShards(datastore.key_dim, threaded, not global_ids)
    parts = []
    for path in index_paths:
        part = faiss.read_index(str(path))
        parts.append(part)
        shards.add_shard(part)
    meta = dict(
        metas[0],
        datastore_id=datastore.datastore_id,
        ntotal=datastore.num_keys,
        id_offset=0,
        shards=[str(p) for p in index_paths],
    )
    knn = KnnIndex(shards, meta, keepalive=parts)
    if nprobe is not None:
        knn.nprobe = nprobe
    return knn


def merge_index_ondisk(
    trained: str | os.PathLike,
    index_paths: Sequence[str | os.PathLike],
    datastore: Datastore,
    out: str | os.PathLike,
    ivfdata: str | os.PathLike | None = None,
    *,
    overwrite: bool = False,
) -> Path:
    """Merge per-shard IVF indexes into one index whose inverted lists live in ``ivfdata`` on disk.

    Every shard index must have been built with ``--trained trained`` (same
    coarse quantizer and codebooks) from the shard datastores of ``datastore``,
    in shard order. ``ivfdata`` defaults to ``out`` with suffix ``.ivfdata``;
    the index file records its absolute path, so keep the two together.
    """
    out = Path(out)
    ivfdata = Path(ivfdata) if ivfdata is not None else out.with_suffix(".ivfdata")
    if (out.exists() or ivfdata.exists()) and not overwrite:
        raise KnnlmError(f"{out} or {ivfdata} exists; choose another --out or pass --overwrite")
    trained_meta = read_index_meta(Path(trained))
    if trained_meta.get("role") != "trained":
        raise KnnlmError(f"{trained} is not a trained empty index (role {trained_meta.get('role')!r})")
    for path, meta in zip(index_paths, _check_shard_indexes(index_paths, datastore), strict=True):
        if meta.get("trained_id") != trained_meta["trained_id"]:
            raise KnnlmError(
                f"{path} was not built from the trained index {trained} (other quantizer); "
                f"rebuild it with `knnlm index build --trained {trained}`"
            )
    Path(f"{out}.meta.json").unlink(missing_ok=True)
    ivfdata.unlink(missing_ok=True)
    index = faiss.read_index(str(trained))
    if faiss.try_extract_index_ivf(index) is None:
        raise KnnlmError(f"{trained} is not an IVF index; on-disk merging needs inverted lists")
    # the shard indexes hold merged-datastore rows already: no id shifting
    merge_ondisk(index, [str(p) for p in index_paths], str(ivfdata.resolve()), shift_ids=False)
    if index.ntotal != datastore.num_keys:
        raise KnnlmError(
            f"the merged lists hold {index.ntotal} vectors, not the {datastore.num_keys} keys of "
            f"{datastore.path}; check the shard indexes"
        )
    meta = dict(
        trained_meta,
        role="index",
        datastore_id=datastore.datastore_id,
        ntotal=datastore.num_keys,
        id_offset=0,
        ondisk={"ivfdata": str(ivfdata.resolve()), "shards": [str(p) for p in index_paths]},
    )
    write_index_file(index, out, meta)
    logger.info("merged %d shard indexes into %s (lists in %s)", len(index_paths), out, ivfdata)
    return out
