"""Parametric components in a cache: what replaces the kNN distribution in Eq. 5.

A component is any next-word distribution ``P_comp`` evaluated on the cache's
tokens; the score phase interpolates it with the base LM exactly like the kNN
distribution: ``(1−λ)·P_LM + λ·P_comp``, λ tuned on validation. Three sources:

* a trained datastore replacement (``--arch knnlm_ds_replacement`` checkpoint): its
  head is applied to the cache's stored ``query_att``/``query_ffn`` (fp16) features;
* another LM (a second seed, an overfitted continuation): the ``lm_logprob`` of a
  cache dumped from that checkpoint over the same tokens;
* the base LM's own distribution cut to its top k words with temperature τ
  (Appendix E), recomputed from the stored ``query_ffn`` features.

Layout: ``CACHE/components/<name>/{logprob.npy, meta.json}``, meta written last.
``logprob.npy`` is float32 ``[T]``: the natural-log probability of each target
(``-inf`` where the component gives it none).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache
from knnlm.io import sha256_files, write_json_atomic

COMPONENTS_DIR = "components"
COMPONENT_FORMAT = "knnlm-component"
KINDS = ("learned", "mos", "clusters", "lm", "topk")


def component_dir(cache: Cache, name: str) -> Path:
    if not name or "/" in name or name.startswith("."):
        raise KnnlmError(f"--name {name!r} must be a plain folder name")
    return cache.path / COMPONENTS_DIR / name


def write_component(cache: Cache, name: str, logprob: np.ndarray, knobs: Mapping[str, Any], source: Mapping) -> Path:
    """Store a component's target log-probs; an existing component of that name is replaced only at the end."""
    logprob = np.asarray(logprob, dtype=np.float32)
    if logprob.shape != (cache.n_tokens,):
        raise KnnlmError(f"component {name!r} has {logprob.shape} log-probs, the cache {cache.n_tokens} tokens")
    if np.isnan(logprob).any() or (logprob > 1e-3).any():
        raise KnnlmError(f"component {name!r}: log-probabilities must be <= 0 and not NaN")
    if knobs.get("kind") not in KINDS:
        raise KnnlmError(f"component kind must be one of {KINDS}, got {knobs.get('kind')!r}")
    out = component_dir(cache, name)
    out.mkdir(parents=True, exist_ok=True)
    (out / "meta.json").unlink(missing_ok=True)  # a folder without meta.json is never read
    tmp = out / "logprob.tmp.npy"
    np.save(tmp, logprob)
    os.replace(tmp, out / "logprob.npy")
    meta = {
        "format": COMPONENT_FORMAT,
        "format_version": 1,
        "name": name,
        "n_tokens": cache.n_tokens,
        "cache_checkpoint_fingerprint": cache.checkpoint_fingerprint,
        "knobs": dict(knobs),
        "source": dict(source),
    }
    write_json_atomic(out / "meta.json", meta)
    return out


def component_names(cache: Cache) -> list[str]:
    root = cache.path / COMPONENTS_DIR
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "meta.json").is_file())


def read_component(cache: Cache, name: str) -> tuple[np.ndarray, dict[str, Any]]:
    """(log-probs [T], meta) of a component, checked against the cache it sits in."""
    folder = component_dir(cache, name)
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        have = ", ".join(component_names(cache)) or "none"
        raise KnnlmError(f"{cache.path} has no component {name!r} (has: {have}); add it with `knnlm eval component`")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != COMPONENT_FORMAT or int(meta.get("n_tokens", -1)) != cache.n_tokens:
        raise KnnlmError(f"{meta_path} does not describe {cache.n_tokens} tokens of this cache; recompute it")
    if meta.get("cache_checkpoint_fingerprint") != cache.checkpoint_fingerprint:
        raise KnnlmError(f"{meta_path} was computed for another dump of this split; recompute it")
    logprob = np.load(folder / "logprob.npy", mmap_mode="r")
    if logprob.shape != (cache.n_tokens,):
        raise KnnlmError(f"{folder / 'logprob.npy'} has shape {logprob.shape}, expected ({cache.n_tokens},)")
    return np.asarray(logprob, dtype=np.float64), meta


def _queries(cache: Cache, key_type: str) -> np.ndarray:
    path = cache.path / f"query_{key_type}.npy"
    if not path.is_file():
        raise KnnlmError(f"{path} is missing: dump the cache with its {key_type} queries (`knnlm eval dump`)")
    return np.load(path, mmap_mode="r")


def _target_logprobs(head, queries: np.ndarray, targets: np.ndarray, batch: int) -> np.ndarray:
    out = np.empty(len(targets), dtype=np.float32)
    with torch.no_grad():
        for start in range(0, len(targets), batch):
            end = min(len(targets), start + batch)
            h = torch.from_numpy(np.asarray(queries[start:end], dtype=np.float32))
            target = torch.from_numpy(np.array(targets[start:end], dtype=np.int64))
            out[start:end] = head.target_log_probs(h, target).float().numpy()
    return out


def _load(checkpoint: str, data: str):
    """(model in eval mode, its config, updates it was trained for), reading the checkpoint file once."""
    from fairseq import checkpoint_utils

    from knnlm.models.loading import fairseq_hydra_compat

    if not Path(checkpoint).is_file():
        raise KnnlmError(f"--checkpoint {checkpoint} does not exist")
    with fairseq_hydra_compat():
        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint, {"data": data})
        num_updates = (state.get("optimizer_history") or [{}])[-1].get("num_updates")
        models, cfg, _task = checkpoint_utils.load_model_ensemble_and_task([checkpoint], state=state)
    return models[0].eval(), cfg, num_updates


def _sizes_knobs(sizes_path: str) -> dict[str, Any]:
    sidecar = Path(sizes_path).with_suffix(".json")
    info = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    return {"sizes": info.get("by", "file"), "sizes_file": sizes_path}


def head_component(cache: Cache, checkpoint: str, data: str, batch: int = 2048) -> tuple[np.ndarray, dict, dict]:
    """Target log-probs of a ``knnlm_ds_replacement`` head over the cache's stored queries."""
    from knnlm.softmax_alternatives.model import DatastoreReplacementLM

    model, cfg, num_updates = _load(checkpoint, data)
    if not isinstance(model, DatastoreReplacementLM):
        raise KnnlmError(f"{checkpoint} is not a --arch knnlm_ds_replacement checkpoint; use --lm-cache for an LM")
    base = str(cfg.model.base_checkpoint)
    if sha256_files([base]) != cache.checkpoint_fingerprint:
        raise KnnlmError(
            f"{checkpoint} was trained on base {base}, but {cache.path} was dumped from another "
            f"checkpoint; dump the cache from that base LM"
        )
    if model.head_dict_size() != cache.dict_size:
        raise KnnlmError(f"{checkpoint} predicts {model.head_dict_size()} words, the cache has {cache.dict_size}")
    m = cfg.model
    kind = str(m.ds_kind)
    knobs: dict[str, Any] = {"kind": kind, "key_type": model.key_type}
    if kind == "learned":
        knobs["n"] = round(model.head.rows / cache.dict_size, 6)
        knobs.update(_sizes_knobs(m.ds_sizes) if m.ds_sizes else {"sizes": "uniform"})
        knobs["init"] = str(m.ds_init)
    elif kind == "mos":
        knobs.update(components=int(m.mos_components), train_output=bool(m.mos_train_output))
    else:
        knobs.update(n_clusters=int(model.head.centroids.shape[0]), train_centroids=bool(m.ds_train_centroids))
    crit = cfg.criterion
    knobs["loss"] = str(getattr(crit, "ds_loss", "ce"))
    if knobs["loss"] == "interpolated":
        knobs["loss_lambda"] = float(crit.ds_loss_lambda)
    knobs["updates"] = num_updates
    knobs["lr"] = float(list(cfg.optimization.lr)[0])
    knobs["max_tokens"] = cfg.dataset.max_tokens
    logprob = _target_logprobs(model.head, _queries(cache, model.key_type), np.asarray(cache.targets), batch)
    source = {"checkpoint": str(Path(checkpoint).resolve()), "input": f"cached fp16 query_{model.key_type}"}
    return logprob, knobs, source


def clusters_component(cache: Cache, clusters: str, batch: int = 1024) -> tuple[np.ndarray, dict, dict]:
    """An untrained clustered datastore (k-means centroids and their word mix) over the cached queries."""
    from knnlm.softmax_alternatives.clusters import load_clusters
    from knnlm.softmax_alternatives.heads import ClusteredDatastore

    centroids, m, meta = load_clusters(clusters, cache.dict_size)
    key_type = str(meta.get("key_type", "att"))
    head = ClusteredDatastore(centroids, m, str(meta.get("similarity", "l2")))
    logprob = _target_logprobs(head, _queries(cache, key_type), np.asarray(cache.targets), batch)
    knobs = {"kind": "clusters", "key_type": key_type, "n_clusters": int(len(centroids)), "train_centroids": False,
             "loss": None, "updates": 0}
    return logprob, knobs, {"clusters": str(Path(clusters).resolve()), "input": f"cached fp16 query_{key_type}"}


def lm_component(cache: Cache, other: Cache) -> tuple[np.ndarray, dict, dict]:
    """Another LM's target log-probs: ``other`` must be a cache of the same tokens."""
    if other.n_tokens != cache.n_tokens or not np.array_equal(np.asarray(other.targets), np.asarray(cache.targets)):
        raise KnnlmError(
            f"--lm-cache {other.path} holds other tokens than {cache.path}: dump it with the same --split, "
            f"--tokens-per-sample, --context-window and --limit-tokens"
        )
    if other.dictionary_fingerprint != cache.dictionary_fingerprint:
        raise KnnlmError(f"--lm-cache {other.path} uses another dictionary than {cache.path}")
    source = {"lm_cache": str(other.path.resolve()), "checkpoint_fingerprint": other.checkpoint_fingerprint}
    return np.asarray(other.lm_logprob, dtype=np.float32), {"kind": "lm"}, source


def topk_components(
    cache: Cache, checkpoint: str, data: str, ks: Sequence[int], temperatures: Sequence[float], batch: int = 1024
) -> dict[tuple[int, float], tuple[np.ndarray, dict, dict]]:
    """The base LM's distribution masked to its top k words, tempered by τ, from the stored ``query_ffn``.

    One pass over the queries serves every (k, τ): the full distribution is computed once per batch.
    """
    from knnlm.softmax_alternatives.base import output_log_probs
    from knnlm.softmax_alternatives.heads import topk_target_logprobs

    if sha256_files([checkpoint]) != cache.checkpoint_fingerprint:
        raise KnnlmError(f"--checkpoint {checkpoint} is not the base LM {cache.path} was dumped from")
    model, _cfg, _updates = _load(checkpoint, data)
    queries, targets = _queries(cache, "ffn"), np.asarray(cache.targets)
    ks, temps = [int(k) for k in ks], [float(t) for t in temperatures]
    settings = [(k, t) for k in ks for t in temps]
    out = {s: np.empty(len(targets), dtype=np.float32) for s in settings}
    with torch.no_grad():
        for start in range(0, len(targets), batch):
            end = min(len(targets), start + batch)
            full = output_log_probs(model.decoder, torch.from_numpy(np.asarray(queries[start:end], dtype=np.float32)))
            target = torch.from_numpy(np.array(targets[start:end], dtype=np.int64))
            for setting, values in topk_target_logprobs(full, target, ks, temps).items():
                out[setting][start:end] = values.numpy()
    source = {"checkpoint": str(Path(checkpoint).resolve()), "input": "cached fp16 query_ffn"}
    return {(k, t): (out[(k, t)], {"kind": "topk", "k": k, "temperature": t}, source) for k, t in settings}


def topk_component(
    cache: Cache, checkpoint: str, data: str, k: int, temperature: float, batch: int = 1024
) -> tuple[np.ndarray, dict, dict]:
    """One (k, τ) of :func:`topk_components`."""
    return topk_components(cache, checkpoint, data, [k], [temperature], batch)[(int(k), float(temperature))]
