"""A text as a one-off cache, so that ``knnlm inspect --prompt`` shows it like any cached split.

Each word of the prompt is a target, predicted from the words before it (with the
``</s>`` that fairseq puts before a stream), exactly as ``knnlm eval dump`` treats
a split: the same windows, the same LM pass (:func:`~knnlm.evaluation.dump.lm_batch`),
then the same search and checks (:func:`~knnlm.evaluation.dump.dump_retrieval`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from knnlm.datastore.build import make_plan
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import write_cache_meta
from knnlm.evaluation.dump import RetrievalConfig, dump_retrieval, lm_batch
from knnlm.io import NpyRowWriter
from knnlm.models.capture import KEY_TYPES
from knnlm.models.devices import resolve_device
from knnlm.models.fairseq_lm import FairseqLM
from knnlm.models.windows import TokenStream

PROMPT_SPLIT = "prompt"


def prompt_cache(text: str, out: Path, checkpoint: str, data: str, retrieval: RetrievalConfig) -> list[str]:
    """Write the cache of ``text`` (whitespace-separated words) into ``out`` and retrieve for every token.

    ``retrieval`` names the datastore, index and search (its ``cache`` is set to ``out``).
    Returns the prompt's words, which the viewer shows as the tokens' contexts.
    """
    words = text.split()
    if not words:
        raise KnnlmError("--prompt is empty; give the words to run the model on")
    device = resolve_device(retrieval.device)
    lm = FairseqLM.load(checkpoint, data)
    ids = np.array([lm.dictionary.index(w) for w in words], dtype=np.int64)
    stream = TokenStream([ids], np.array([len(ids)]), lm.dictionary.eos())
    plan = make_plan(lm, len(ids), None, None, max_tokens=8192)
    dims = {kt: lm.key_dim(kt) for kt in KEY_TYPES}
    out.mkdir(parents=True, exist_ok=True)
    n = len(ids)
    arrays = {
        "targets": (out / "targets.npy", (n,), "int64"),
        "lm_logprob": (out / "lm_logprob.npy", (n,), "float32"),
        "positions": (out / "positions.npy", (n,), "int32"),
        **{f"query_{kt}": (out / f"query_{kt}.npy", (n, dims[kt]), "float16") for kt in KEY_TYPES},
    }
    lm.prepare(device, fp16=False)
    capture = lm.capture()
    try:
        with NpyRowWriter(arrays) as writer:
            for b in range(plan.num_batches):
                lm_batch(lm, capture, plan, stream, b, device, writer)
    finally:
        capture.remove()
    source = lm.source()
    write_cache_meta(
        out,
        split=PROMPT_SPLIT,
        n_tokens=n,
        dict_size=lm.vocab_size,
        checkpoint_fingerprint=source["checkpoint_sha256"],
        key_dims=dims,
        retrievals=[],
        extra_meta={"dictionary_fingerprint": source["dictionary_sha256"], "prompt": {"words": words}},
    )
    dump_retrieval(dataclasses.replace(retrieval, cache=str(out)))
    return words
