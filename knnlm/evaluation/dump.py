"""The dump phase: one LM pass over a split, then one retrieval per datastore, into a cache.

``dump_lm`` runs the base LM (a fairseq checkpoint or a Hugging Face causal LM,
see :mod:`knnlm.models.base_lm`) over a split with fairseq eval_lm's contexts (the
same :class:`~knnlm.models.windows.ContextPlan` the datastore builder uses) and
writes, per target token, its id, the LM log-probability of the target, the
``att`` and ``ffn`` query vectors and its position in the context window. Where
tokens are sub-word pieces of the dataset's words (HF tokenizers), it also writes
each token's word index, so that perplexity is reported per token and per word.
``dump_retrieval`` then searches one datastore for every cached query and writes
the top ``k_max`` neighbour ids, scores and values as one retrieval folder (see
:mod:`knnlm.evaluation.cache`). Scoring afterwards needs neither the model nor
the datastore.

Both passes stream rows into preallocated ``.npy`` files (:class:`knnlm.io.NpyRowWriter`)
and record their progress after each synced chunk, so an interrupted dump resumes
from the last complete chunk; the cache's ``meta.json`` is (re)written last, atomically.
Neighbour ids and values are stored in the narrowest signed integer type that
holds the datastore's row ids and the vocabulary (int32 up to 2^31 keys).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from knnlm.datastore import Datastore
from knnlm.datastore.build import make_plan
from knnlm.datastore.retriever import Retriever, check_search_options
from knnlm.errors import KnnlmError, require_at_least
from knnlm.evaluation.cache import (
    Cache,
    RetrievalInfo,
    default_retrieval_name,
    write_cache_meta,
    write_json_atomic,
)
from knnlm.io import NpyRowWriter, WriterLock, describe_differences, read_progress
from knnlm.models.base_lm import BaseLM, Capture
from knnlm.models.capture import KEY_TYPES
from knnlm.models.devices import resolve_device
from knnlm.models.factory import BASE_MODEL_HELP, open_base_lm
from knnlm.models.windows import ContextPlan, batch_inputs

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"


@dataclass
class LMDumpConfig:
    """Options of ``knnlm eval dump``: which model, which split, which contexts (the CLI is generated from it)."""

    checkpoint: str | None = field(metadata={"help": BASE_MODEL_HELP["checkpoint"]})  # None with hf_model
    data: str = field(metadata={"help": BASE_MODEL_HELP["data"]})
    out: str = field(metadata={"help": "cache folder to write"})
    split: str = field(default="valid", metadata={"help": "split to dump"})
    tokens_per_sample: int | None = field(
        default=None,
        metadata={"help": "window length T (default: the checkpoint's; with --hf-model min(1024, the model's "
                  "positions))"},
    )
    context_window: int | None = field(
        default=None, metadata={"help": "context C carried into each window (default: T/2); the window slides by T - C"}
    )
    max_tokens: int = field(default=8192, metadata={"help": "tokens per forward batch"})
    limit_tokens: int | None = field(default=None, metadata={"help": "only the split's first N target tokens"})
    chunk_batches: int = field(default=32, metadata={"help": "batches between commits (resume granularity)"})
    device: str = field(default="auto", metadata={"help": "auto (GPU if present), cpu, cuda, cuda:1, ..."})
    hf_model: str | None = field(default=None, metadata={"help": BASE_MODEL_HELP["hf_model"]})
    hf_revision: str | None = field(default=None, metadata={"help": BASE_MODEL_HELP["hf_revision"]})
    overwrite: bool = field(
        default=False,
        metadata={"help": "replace a complete cache in --out made from another checkpoint, data, split or window"},
    )


# what a cache's content depends on; a complete cache with other values is another cache
CACHE_IDENTITY = ("checkpoint_sha256", "data_sha256", "split", "n_tokens", "tokens_per_sample", "context_window")
CACHE_FILES = ("targets.npy", "lm_logprob.npy", "positions.npy", "word_ids.npy", "query_att.npy", "query_ffn.npy",
               PROGRESS)


def check_dump_options(cfg: LMDumpConfig) -> None:
    """Refuse meaningless options before any model is loaded."""
    bounds = (("--limit-tokens", cfg.limit_tokens, 1), ("--max-tokens", cfg.max_tokens, 1),
              ("--tokens-per-sample", cfg.tokens_per_sample, 1), ("--context-window", cfg.context_window, 0),
              ("--chunk-batches", cfg.chunk_batches, 1))
    for name, value, low in bounds:
        require_at_least(name, value, low)
    resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise KnnlmError(f"--out {out} is a file; the cache is a folder: choose another path")


def _cache_identity(meta: dict[str, Any]) -> dict[str, Any]:
    """The identity of a complete cache from its meta.json (caches of every format version)."""
    dump = meta.get("dump", {})
    if "identity" in dump:
        return dump["identity"]
    context = dump.get("context", {})
    return {"checkpoint_sha256": meta.get("checkpoint_fingerprint"), "data_sha256": dump.get("data_sha256"),
            "split": meta.get("split"), "n_tokens": meta.get("n_tokens"),
            "tokens_per_sample": context.get("tokens_per_sample"), "context_window": context.get("context_window")}


def _clear_cache(out: Path) -> None:
    """Remove a cache's files (meta.json first, so that no reader sees a half-replaced cache)."""
    import shutil

    (out / "meta.json").unlink(missing_ok=True)
    for name in CACHE_FILES:
        (out / name).unlink(missing_ok=True)
    for folder in ("knn", "components"):
        shutil.rmtree(out / folder, ignore_errors=True)


def id_dtype(limit: int) -> str:
    """The narrowest signed integer dtype (at least int32, as caches require) for ids in [−1, limit)."""
    return "int32" if limit <= np.iinfo(np.int32).max else "int64"


def dump_lm(cfg: LMDumpConfig) -> Path:
    """Write ``targets``, ``lm_logprob``, ``query_att``, ``query_ffn``, ``positions`` of a split.

    Holds the cache's :class:`~knnlm.io.WriterLock` meanwhile: a second writer is refused.
    """
    check_dump_options(cfg)
    with WriterLock.for_folder(cfg.out, f"cache {cfg.out}"):
        return _dump_lm(cfg)


def _dump_lm(cfg: LMDumpConfig) -> Path:
    """:func:`dump_lm` under its lock (options checked already)."""
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    lm = open_base_lm(cfg.checkpoint, cfg.hf_model, cfg.data, cfg.hf_revision)
    split_tokens = lm.load_split(cfg.data, cfg.split, words=True)
    stream, data_sha = split_tokens.stream, split_tokens.data_sha256
    n_tokens = len(stream) if cfg.limit_tokens is None else min(cfg.limit_tokens, len(stream))
    if n_tokens <= 0:
        raise KnnlmError(f"--limit-tokens must be positive; got {cfg.limit_tokens}")
    plan = make_plan(lm, n_tokens, cfg.tokens_per_sample, cfg.context_window, cfg.max_tokens)
    dims = {kt: lm.key_dim(kt) for kt in KEY_TYPES}
    source = lm.source()
    checkpoint_sha = source["checkpoint_sha256"]
    spec = {
        "checkpoint_sha256": checkpoint_sha,
        "data_sha256": data_sha,
        "split": cfg.split,
        "n_tokens": n_tokens,
        **plan.settings(),
        "windows_per_batch": plan.windows_per_batch,
    }
    identity = {k: spec[k] for k in CACHE_IDENTITY}
    if (out / "meta.json").exists():
        old = json.loads((out / "meta.json").read_text())
        if old.get("dump", {}).get("complete") and _cache_identity(old) == identity:
            logger.info("%s is complete already", out)
            return out
        if not cfg.overwrite:
            raise KnnlmError(
                f"{out} holds a cache of other inputs ({describe_differences(_cache_identity(old), identity)}); "
                "pass --overwrite to replace it (its retrievals go too) or choose another --out"
            )
        _clear_cache(out)
    out.mkdir(parents=True, exist_ok=True)
    start = read_progress(out / PROGRESS, spec)
    resume = start > 0
    arrays = {
        "targets": (out / "targets.npy", (n_tokens,), "int64"),
        "lm_logprob": (out / "lm_logprob.npy", (n_tokens,), "float32"),
        "positions": (out / "positions.npy", (n_tokens,), "int32"),
        **{f"query_{kt}": (out / f"query_{kt}.npy", (n_tokens, dims[kt]), "float16") for kt in KEY_TYPES},
    }
    if resume:
        logger.info("resuming %s from batch %d of %d", out, start, plan.num_batches)
    lm.prepare(device, fp16=False)
    capture = lm.capture()
    bar = tqdm(total=n_tokens, initial=plan.batch_targets(start)[0] if start < plan.num_batches else n_tokens,
               unit="tok", unit_scale=True, desc=f"dump {cfg.split}", disable=None)
    try:
        with NpyRowWriter(arrays, resume=resume) as writer:
            for chunk0 in range(start, plan.num_batches, cfg.chunk_batches):
                chunk1 = min(chunk0 + cfg.chunk_batches, plan.num_batches)
                for b in range(chunk0, chunk1):
                    s, e = plan.batch_targets(b)
                    lm_batch(lm, capture, plan, stream, b, device, writer)
                    bar.update(e - s)
                writer.sync()
                write_json_atomic(out / PROGRESS, {"spec": spec, "next": chunk1})
    finally:
        bar.close()
        capture.remove()
    units = dict(split_tokens.units)
    if split_tokens.word_ids is not None:
        word_ids = np.asarray(split_tokens.word_ids[:n_tokens], dtype=np.int64)
        np.save(out / "word_ids.npy", word_ids)
        units["n_words"] = int(word_ids[-1]) + 1
    lm_logprob = np.load(out / "lm_logprob.npy").astype(np.float64)
    logger.info("%s: %d tokens, %s", cfg.split, n_tokens, describe_perplexity(lm_logprob, units.get("n_words")))
    extra = {
        "dump": {
            "complete": True,
            "identity": identity,
            **lm.paths(),
            "data": str(Path(cfg.data).resolve()),
            "split_tokens": len(stream),
            "limit_tokens": cfg.limit_tokens,
            "context": plan.settings(),
            "data_sha256": data_sha,
        },
        "dictionary_fingerprint": source["dictionary_sha256"],
        **({"base_model": source["base_model"]} if "base_model" in source else {}),
        **({"units": units} if units else {}),
    }
    write_cache_meta(
        out,
        split=cfg.split,
        n_tokens=n_tokens,
        dict_size=lm.vocab_size,
        checkpoint_fingerprint=checkpoint_sha,
        key_dims=dims,
        retrievals=[],
        extra_meta=extra,
    )
    (out / PROGRESS).unlink(missing_ok=True)
    return out


@torch.inference_mode()
def lm_batch(
    lm: BaseLM,
    capture: Capture,
    plan: ContextPlan,
    stream: Any,
    b: int,
    device: torch.device,
    writer: NpyRowWriter,
) -> None:
    """Forward batch ``b``; store its targets' LM log-probs, queries and window positions."""
    tokens, row, col = batch_inputs(plan, stream, b, lm.pad)
    s_b, e_b = plan.batch_targets(b)
    targets = stream.targets(s_b, e_b)
    capture.clear()
    r, c = torch.from_numpy(row).to(device), torch.from_numpy(col).to(device)
    t = torch.from_numpy(targets).to(device)
    lprobs = lm.target_logprobs(torch.from_numpy(tokens).to(device), r, c, t)
    writer.write("lm_logprob", s_b, lprobs.cpu().numpy())
    writer.write("targets", s_b, targets)
    writer.write("positions", s_b, col)
    for kt in KEY_TYPES:
        writer.write(f"query_{kt}", s_b, capture.pop(kt)[r, c].to(torch.float16).cpu().numpy())
    capture.clear()


@dataclass
class RetrievalConfig:
    """Options of ``knnlm eval retrieve``: which datastore, which search, how many neighbours (the CLI is
    generated from it)."""

    cache: str = field(metadata={"help": "cache folder (knnlm eval dump)"})
    datastore: str = field(metadata={"help": "datastore folder (knnlm datastore build)"})
    index: str | None = field(default=None, metadata={"help": "FAISS index file; without it: exact search"})
    similarity: str | None = field(default=None, metadata={"help": "l2 or ip; required for exact search"})
    real_score: bool = field(default=False, metadata={"help": "rescore FAISS neighbours from the stored keys"})
    k_max: int = field(default=1024, metadata={"help": "neighbours kept per token"})
    nprobe: int | None = field(default=None, metadata={"help": "default: the index's stored nprobe"})
    batch: int = field(default=4096, metadata={"help": "queries per search call"})
    device: str = field(default="auto", metadata={"help": "auto (GPU if present), cpu, cuda"})
    mmap: bool = field(
        default=False,
        metadata={"help": "leave the index's inverted lists on disk (faiss IO_FLAG_MMAP): indexes larger than RAM"},
    )
    overwrite: bool = field(
        default=False, metadata={"help": "replace a retrieval of the same name made with another index, nprobe or k"}
    )
    allow_other_checkpoint: bool = field(
        default=False, metadata={"help": "search a datastore built from another checkpoint than the cache's (recorded)"}
    )


def check_retrieval_options(cfg: RetrievalConfig) -> None:
    """Refuse meaningless options before anything is opened."""
    for name, value in (("--k-max", cfg.k_max), ("--batch", cfg.batch), ("--nprobe", cfg.nprobe)):
        require_at_least(name, value, 1)
    check_search_options(bool(cfg.index), cfg.similarity, cfg.real_score, cfg.nprobe)
    resolve_device(cfg.device)


def dump_retrieval(cfg: RetrievalConfig) -> Path:
    """Search the datastore for every cached query; write ``knn/<name>/`` and update the cache meta.

    Holds the cache's :class:`~knnlm.io.WriterLock` meanwhile: a second writer is refused.
    """
    check_retrieval_options(cfg)
    if not (Path(cfg.cache) / "meta.json").is_file():
        raise KnnlmError(f"--cache {cfg.cache} is not a cache (no meta.json); dump one with `knnlm eval dump`")
    with WriterLock.for_folder(cfg.cache, f"cache {cfg.cache}"):
        return _dump_retrieval(cfg)


def _dump_retrieval(cfg: RetrievalConfig) -> Path:
    """:func:`dump_retrieval` under its lock (options checked already)."""
    cache = Cache(cfg.cache)
    store = Datastore.open(cfg.datastore)
    if cache.dictionary_fingerprint is not None and cache.dictionary_fingerprint != (
        store.meta["source"]["dictionary_sha256"]
    ):
        raise KnnlmError(
            f"{cfg.datastore} was built with another dictionary than the cache {cfg.cache}; "
            "dump and datastore must come from the same data-bin (or the same --hf-model tokenizer)"
        )
    cache_model, store_model = cache.meta.get("base_model"), store.meta["source"].get("base_model")
    if (cache_model is not None or store_model is not None) and cache_model != store_model:
        raise KnnlmError(
            f"{cfg.datastore} was built with base model {store_model} but the cache {cfg.cache} was dumped "
            f"with {cache_model}; build the datastore and dump the cache with the same --hf-model/--hf-revision"
        )
    key_type = store.key_type
    queries = np.load(Path(cfg.cache) / f"query_{key_type}.npy", mmap_mode="r")
    if queries.shape[1] != store.key_dim:
        raise KnnlmError(
            f"{cfg.cache}: {key_type} queries have dimension {queries.shape[1]} but {cfg.datastore} "
            f"holds {store.key_dim}-d keys; use the datastore of the same checkpoint"
        )
    store_checkpoint = store.meta["source"].get("checkpoint_sha256")
    other_checkpoint = store_checkpoint is not None and store_checkpoint != cache.checkpoint_fingerprint
    if other_checkpoint and not cfg.allow_other_checkpoint:
        raise KnnlmError(
            f"{cfg.datastore} was built from checkpoint {store_checkpoint[:12]} but the cache {cfg.cache} was dumped "
            f"from {str(cache.checkpoint_fingerprint)[:12]}: their keys live in different spaces. Use the datastore "
            "of the cache's checkpoint, or pass --allow-other-checkpoint to search it anyway (recorded)"
        )
    retriever = Retriever.open(
        store, cfg.index, similarity=cfg.similarity, real_score=cfg.real_score, nprobe=cfg.nprobe, device=cfg.device,
        mmap=cfg.mmap,
    )
    index, similarity = retriever.index, retriever.similarity
    k = min(cfg.k_max, store.num_keys)
    mask_source, score_source = retriever.mask_source, retriever.score_source
    name = default_retrieval_name(key_type, similarity, mask_source, score_source)
    folder = Path(cfg.cache) / "knn" / name
    identity = {
        "datastore_id": store.datastore_id,
        "index_sha256": None if index is None else index.meta.get("index_sha256", str(Path(cfg.index).resolve())),
        "nprobe": None if index is None else index.nprobe,
        "k": k,
        "similarity": similarity,
        "mask_source": mask_source,
        "score_source": score_source,
    }
    if (folder / "meta.json").exists():
        old = json.loads((folder / "meta.json").read_text())
        if old.get("spec") == identity and name in cache.retrieval_names:
            logger.info("%s is complete already", folder)
            return folder
        if not cfg.overwrite:
            spec = old.get("spec")
            differences = describe_differences(spec, identity) if spec else "made before retrievals recorded them"
            raise KnnlmError(
                f"{folder} holds a retrieval of other settings ({differences}); pass --overwrite to replace it "
                "(score lines made from it will describe data that is gone) or retrieve into a copy of the cache"
            )
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "meta.json").unlink(missing_ok=True)  # incomplete until rewritten
    n = len(queries)
    arrays = {
        "ids": (folder / "ids.npy", (n, k), id_dtype(store.num_keys)),
        "scores": (folder / "scores.npy", (n, k), "float32"),
        "vals": (folder / "vals.npy", (n, k), id_dtype(cache.dict_size)),
    }
    # a resumed retrieval must also keep the batching and file types of the interrupted one
    spec = {**identity, "batch": cfg.batch, "dtypes": [dtype for _path, _shape, dtype in arrays.values()]}
    start = read_progress(folder / PROGRESS, spec)
    bar = tqdm(total=n, initial=start, unit="q", unit_scale=True, desc=f"retrieve {name}", disable=None)
    with NpyRowWriter(arrays, resume=start > 0) as writer:
        for q0 in range(start, n, cfg.batch):
            q = np.asarray(queries[q0 : q0 + cfg.batch], dtype=np.float32)
            scores, ids = retriever.search(q, k)
            writer.write("ids", q0, ids)
            writer.write("scores", q0, scores)
            writer.write("vals", q0, retriever.values_of(ids))
            writer.sync()
            write_json_atomic(folder / PROGRESS, {"spec": spec, "next": q0 + len(q)})
            bar.update(len(q))
    bar.close()
    info = RetrievalInfo(
        name=name,
        key_type=key_type,
        similarity=similarity,
        mask_source=mask_source,
        score_source=score_source,
        k_max=k,
        datastore={
            "path": str(Path(cfg.datastore).resolve()),
            "size": store.num_keys,
            "fingerprint": store.datastore_id,
            "subsample": store.meta.get("subsample"),
            "checkpoint_sha256": store_checkpoint,
            **({"other_checkpoint": True} if other_checkpoint else {}),
        },
        index=None if index is None else {"factory": index.meta.get("factory"), "nprobe": index.nprobe,
                                          "path": str(Path(cfg.index).resolve())},
        spec=identity,
    )
    _register_retrieval(Path(cfg.cache), cache, info)
    (folder / PROGRESS).unlink(missing_ok=True)
    return folder


def _register_retrieval(path: Path, cache: Cache, info: RetrievalInfo) -> None:
    """Rewrite the cache meta with ``info`` added (replacing an older retrieval of the same name)."""
    meta = dict(cache.meta)
    keep = [cache.retrieval(name).info for name in cache.retrieval_names if name != info.name]
    extra = {k: v for k, v in meta.items() if k not in ("retrievals",)}
    write_cache_meta(
        path,
        split=meta["split"],
        n_tokens=meta["n_tokens"],
        dict_size=meta["dict_size"],
        checkpoint_fingerprint=meta["checkpoint_fingerprint"],
        key_dims=meta["key_dims"],
        retrievals=[*keep, info],
        extra_meta=extra,
    )


def link_cache(source: str | os.PathLike[str], out: str | os.PathLike[str]) -> Path:
    """A cache folder ``out`` that shares ``source``'s per-token arrays (relative symbolic links) but none of its
    retrievals or components.

    A cache holds one retrieval per key type, similarity and sources, so neighbours from another datastore of
    the same keys (one built with ``--subsample``, say) go into such a linked cache: no second LM pass, no
    copy of the queries. Returns at once if ``out`` is already a cache of the same inputs.
    """
    src = Cache(source)
    out = Path(out)
    with WriterLock.for_folder(out, f"cache {out}"):
        if (out / "meta.json").exists():
            old = json.loads((out / "meta.json").read_text())
            if _cache_identity(old) == _cache_identity(src.meta):
                logger.info("%s is complete already", out)
                return out
            differences = describe_differences(_cache_identity(old), _cache_identity(src.meta))
            raise KnnlmError(f"{out} holds a cache of other inputs ({differences}); choose another --out")
        out.mkdir(parents=True, exist_ok=True)
        for name in CACHE_FILES:
            target, link = src.path / name, out / name
            if name == PROGRESS or not target.is_file():
                continue
            link.unlink(missing_ok=True)
            link.symlink_to(os.path.relpath(target.resolve(), out.resolve()))
        extra = {k: v for k, v in src.meta.items() if k not in ("retrievals", "k_max")}
        extra["linked_from"] = str(src.path.resolve())
        write_cache_meta(
            out,
            split=src.split,
            n_tokens=src.n_tokens,
            dict_size=src.dict_size,
            checkpoint_fingerprint=src.checkpoint_fingerprint,
            key_dims=src.meta["key_dims"],
            retrievals=[],
            extra_meta=extra,
        )
    return out


def describe_perplexity(logprobs: np.ndarray, n_words: int | None) -> str:
    """``LM perplexity X per token`` and, where tokens are word pieces, ``, Y per word (W words)``."""
    nll = -float(np.sum(np.asarray(logprobs, dtype=np.float64)))
    text = f"LM perplexity {np.exp(nll / len(logprobs)):.2f} per token"
    if n_words:
        text += f", {np.exp(nll / n_words):.2f} per word ({n_words:,} words, {len(logprobs):,} tokens)"
    return text


def cache_lm_perplexity(path: str | os.PathLike) -> float:
    """exp of the mean negative LM log-prob of a cache (what fairseq-eval-lm reports, in nats)."""
    return float(np.exp(-np.load(Path(path) / "lm_logprob.npy").astype(np.float64).mean()))
