"""``knnlm generate``: kNN-LM decoding of a fairseq LM checkpoint through fairseq's ``SequenceGenerator``.

The checkpoint is wrapped by :class:`knnlm.tasks.KnnInterpolatedLM`, whose normalized
probabilities are Eq. 5; fairseq's generator, search strategies (beam search, sampling) and
language-model inference step run unchanged on it. Each prompt is forced as a prefix, one token
per step, so every step — the prompt's included — searches the datastore once per row.

Prompts are lines of words of the model's dictionary. A word the dictionary does not hold is
refused (naming the line and the words), not silently mapped to ``<unk>``: an unknown word changes
the context the continuation depends on. Write ``<unk>`` in the prompt to mean the unknown word.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from knnlm.datastore.retriever import Retriever
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError, require_at_least
from knnlm.io import dictionary_fingerprint
from knnlm.models.capture import KEY_TYPES
from knnlm.models.devices import resolve_device
from knnlm.models.factory import BASE_MODEL_HELP
from knnlm.models.fairseq_lm import load_language_model
from knnlm.tasks.knnlm_language_modeling import KnnInterpolatedLM

logger = logging.getLogger(__name__)


@dataclass
class GenerateConfig:
    """Options of ``knnlm generate`` (the CLI is generated from it)."""

    checkpoint: str = field(metadata={"help": BASE_MODEL_HELP["checkpoint"]})
    data: str = field(metadata={"help": "fairseq data-bin folder of the checkpoint (its dict.txt)"})
    datastore: str = field(metadata={"help": "datastore folder of this checkpoint (knnlm datastore build)"})
    prompt_file: str = field(metadata={"help": "text file, one prompt per line (words of the dictionary)"})
    index: str | None = field(default=None, metadata={"help": "FAISS index file; without it: exact search"})
    similarity: str | None = field(default=None, metadata={"help": "l2 or ip; required for exact search"})
    real_score: bool = field(default=False, metadata={"help": "rescore FAISS neighbours from the stored keys"})
    nprobe: int | None = field(default=None, metadata={"help": "default: the index's stored nprobe"})
    k: int = field(default=1024, metadata={"help": "neighbours per step"})
    lmbda: float = field(default=0.25, metadata={"help": "interpolation weight λ of the kNN distribution, in [0, 1]"})
    knn_temp: float = field(default=1.0, metadata={"help": "softmax temperature τ of the kNN distribution"})
    knn_key_type: str = field(default="att", metadata={"help": "key of the datastore: att or ffn"})
    beam: int = field(default=1, metadata={"help": "beam size (1: greedy); with --sampling: samples per prompt"})
    sampling: bool = field(default=False, metadata={"help": "sample instead of beam search"})
    sampling_topk: int = field(default=-1, metadata={"help": "sample among the k most likely words (-1: all)"})
    sampling_topp: float = field(
        default=-1.0, metadata={"help": "sample from the smallest set of words of mass p (-1: all)"}
    )
    max_new_tokens: int = field(default=20, metadata={"help": "words generated after each prompt at most"})
    min_new_tokens: int = field(
        default=0, metadata={"help": "words generated before </s> may end one (= --max-new-tokens: fixed length)"}
    )
    seed: int = field(default=1, metadata={"help": "torch seed (sampling)"})
    batch_size: int = field(default=8, metadata={"help": "prompts per generator call (prompts of equal length)"})
    device: str = field(default="auto", metadata={"help": "auto (GPU if present), cpu, cuda"})
    out: str | None = field(default=None, metadata={"help": "JSON-lines file to append to; default: print the text"})


def check_generate_options(cfg: GenerateConfig) -> None:
    """Refuse meaningless options before a model is loaded."""
    for name, value, low in (
        ("--k", cfg.k, 1),
        ("--beam", cfg.beam, 1),
        ("--max-new-tokens", cfg.max_new_tokens, 1),
        ("--min-new-tokens", cfg.min_new_tokens, 0),
        ("--batch-size", cfg.batch_size, 1),
        ("--nprobe", cfg.nprobe, 1),
    ):
        require_at_least(name, value, low)
    if not 0.0 <= cfg.lmbda <= 1.0:
        raise KnnlmError(f"--lmbda must be in [0, 1]; got {cfg.lmbda}")
    if cfg.min_new_tokens > cfg.max_new_tokens:
        raise KnnlmError(
            f"--min-new-tokens {cfg.min_new_tokens} exceeds --max-new-tokens {cfg.max_new_tokens}; lower it"
        )
    if not cfg.knn_temp > 0:
        raise KnnlmError(f"--knn-temp must be positive; got {cfg.knn_temp}")
    if cfg.knn_key_type not in KEY_TYPES:
        raise KnnlmError(f"--knn-key-type must be one of {', '.join(KEY_TYPES)}; got {cfg.knn_key_type!r}")
    if not cfg.sampling and (cfg.sampling_topk != -1 or cfg.sampling_topp != -1.0):
        raise KnnlmError("--sampling-topk and --sampling-topp apply to sampling: add --sampling")
    if cfg.sampling_topp != -1.0 and not 0.0 < cfg.sampling_topp <= 1.0:
        raise KnnlmError(f"--sampling-topp must be in (0, 1]; got {cfg.sampling_topp}")
    if cfg.out is not None and Path(cfg.out).is_dir():
        raise KnnlmError(f"--out {cfg.out} is a folder; give a file such as {cfg.out}/generations.jsonl")
    resolve_device(cfg.device)


def read_prompts(path: str | Path, dictionary: Any) -> list[tuple[str, list[int]]]:
    """``(text, token ids)`` of each line of ``path``; empty lines and unknown words are refused."""
    path = Path(path)
    if not path.is_file():
        raise KnnlmError(f"--prompt-file {path} does not exist; give a text file with one prompt per line")
    prompts = []
    unk = dictionary.unk()
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        words = line.split()
        if not words:
            raise KnnlmError(f"--prompt-file {path}, line {number} is empty; every line is a prompt: remove it")
        ids = [dictionary.index(word) for word in words]
        unknown = [w for w, i in zip(words, ids, strict=True) if i == unk and w != dictionary.unk_word]
        if unknown:
            shown = ", ".join(repr(w) for w in unknown[:5])
            raise KnnlmError(
                f"--prompt-file {path}, line {number}: {shown} not in the dictionary of the model; rephrase, or "
                f"write {dictionary.unk_word} for an unknown word"
            )
        prompts.append((" ".join(words), ids))
    if not prompts:
        raise KnnlmError(f"--prompt-file {path} holds no prompt; write one prompt per line")
    return prompts


def open_knn_model(cfg: GenerateConfig) -> tuple[KnnInterpolatedLM, Any]:
    """The checkpoint wrapped with the kNN interpolation of ``cfg``, and its fairseq task."""
    lm, task = load_language_model(cfg.checkpoint, cfg.data)
    store = Datastore.open(
        cfg.datastore, key_type=cfg.knn_key_type, dictionary_sha256=dictionary_fingerprint(task.source_dictionary)
    )
    retriever = Retriever.open(
        store, cfg.index, similarity=cfg.similarity, real_score=cfg.real_score, nprobe=cfg.nprobe, device=cfg.device
    )
    model = KnnInterpolatedLM(
        lm,
        retriever,
        min(cfg.k, retriever.num_keys),
        lmbda=cfg.lmbda,
        temperature=cfg.knn_temp,
        key_type=cfg.knn_key_type,
        full_distribution=True,
    )
    return model, task


def build_generator(model: torch.nn.Module, dictionary: Any, cfg: GenerateConfig, prompt_len: int) -> Any:
    """fairseq's ``SequenceGenerator`` for prompts of ``prompt_len`` words and ``cfg``'s search.

    fairseq counts lengths from the first prompt word: ``</s>`` is barred before step ``min_len``
    and forced at step ``max_len_b``, so both limits are the prompt length plus the new words.
    """
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    strategy = search.Sampling(dictionary, cfg.sampling_topk, cfg.sampling_topp) if cfg.sampling else None
    return SequenceGenerator(
        [model],
        dictionary,
        beam_size=cfg.beam,
        max_len_a=0,
        max_len_b=prompt_len + cfg.max_new_tokens,
        min_len=prompt_len + cfg.min_new_tokens,
        search_strategy=strategy,
    )


def batches(prompts: list[tuple[str, list[int]]], batch_size: int) -> Iterator[list[int]]:
    """Indices of prompts of equal length, ``batch_size`` at most per batch (so every row has the same limits)."""
    by_length: dict[int, list[int]] = {}
    for i, (_, ids) in enumerate(prompts):
        by_length.setdefault(len(ids), []).append(i)
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            yield rows[start : start + batch_size]


@torch.no_grad()
def generate_continuations(
    model: torch.nn.Module, task: Any, prompts: list[tuple[str, list[int]]], cfg: GenerateConfig
) -> list[dict[str, Any]]:
    """The best hypothesis of each prompt: continuation ids (no end of line), fairseq's score, why it stopped.

    ``seconds`` is the prompt's share of its batch's wall clock (the batch's time over its rows), so
    that the records of a run add up to the time spent generating, model loading excluded.
    """
    dictionary = task.source_dictionary
    device = resolve_device(cfg.device)
    model.eval().to(device)
    limit = model.max_decoder_positions() - 1
    torch.manual_seed(cfg.seed)
    results: list[dict[str, Any]] = [{} for _ in prompts]
    for rows in batches(prompts, cfg.batch_size):
        length = len(prompts[rows[0]][1])
        if length + cfg.max_new_tokens > limit:
            raise KnnlmError(
                f"--prompt-file line {rows[0] + 1}: {length} words plus --max-new-tokens {cfg.max_new_tokens} exceed "
                f"the {limit} positions the model can generate; shorten the prompt or lower --max-new-tokens"
            )
        tokens = torch.tensor([prompts[i][1] for i in rows], dtype=torch.long, device=device)
        sample = {
            "id": torch.arange(len(rows), device=device),
            "net_input": {"src_tokens": tokens, "src_lengths": torch.full((len(rows),), length, device=device)},
        }
        generator = build_generator(model, dictionary, cfg, length)
        start = time.perf_counter()
        hypos = task.inference_step(generator, [model], sample, prefix_tokens=tokens)
        seconds = (time.perf_counter() - start) / len(rows)
        for row, hypo in zip(rows, hypos, strict=True):
            best = hypo[0]
            ids = best["tokens"][length:].tolist()
            if ids and ids[-1] == dictionary.eos():
                ids = ids[:-1]
            results[row] = {
                "tokens": ids,
                "score": float(best["score"]),
                "stopped": "length" if len(ids) >= cfg.max_new_tokens else "eos",
                "seconds": seconds,
            }
    return results


def run_generate(cfg: GenerateConfig) -> list[dict[str, Any]]:
    """Generate a continuation of every prompt of ``cfg.prompt_file``; one record per prompt."""
    check_generate_options(cfg)
    model, task = open_knn_model(cfg)
    dictionary = task.source_dictionary
    prompts = read_prompts(cfg.prompt_file, dictionary)
    logger.info(
        "generating for %d prompts (λ=%g, k=%d, τ=%g, %s keys, %s search)",
        len(prompts),
        cfg.lmbda,
        model.k,
        cfg.knn_temp,
        cfg.knn_key_type,
        model.retriever.mask_source,
    )
    settings = {k: v for k, v in asdict(cfg).items() if k not in ("prompt_file", "out", "batch_size", "device")}
    records = []
    for (text, ids), result in zip(prompts, generate_continuations(model, task, prompts, cfg), strict=True):
        records.append(
            {
                "prompt": text,
                "prompt_tokens": ids,
                "continuation": dictionary.string(torch.tensor(result["tokens"], dtype=torch.long)),
                **result,
                "settings": settings,
            }
        )
    return records
