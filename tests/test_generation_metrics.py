"""The generation study: its measures against brute force on tiny inputs, its two steps, and its script.

Offline and on CPU: random token lists, the session's tiny fairseq checkpoint and data-bin.
"""

from __future__ import annotations

import json
import math
import subprocess
from itertools import product
from pathlib import Path

import numpy as np
import pytest
import torch

from knnlm.errors import KnnlmError
from knnlm.generation import study
from knnlm.generation.metrics import (
    TrainingNgrams,
    bootstrap_ratio_ci,
    continuation_logprobs,
    distinct_n,
    has_repeated_ngram,
    ngram_hashes,
)
from knnlm.models.fairseq_lm import load_language_model

from .conftest import with_python_on_path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "generation_study.sh"


def random_sequences(seed: int, count: int = 6, vocab: int = 5, max_len: int = 12) -> list[list[int]]:
    """Short sequences over a tiny vocabulary, so that n-grams repeat and reappear across sequences."""
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab, size=rng.integers(0, max_len + 1)).tolist() for _ in range(count)]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 3])
def test_distinct_n_and_repeats_match_brute_force(seed, n):
    sequences = random_sequences(seed)
    grams = [tuple(s[i : i + n]) for s in sequences for i in range(len(s) - n + 1)]
    assert distinct_n(sequences, n) == pytest.approx(len(set(grams)) / len(grams))
    for s in sequences:
        windows = [tuple(s[i : i + n]) for i in range(len(s) - n + 1)]
        assert has_repeated_ngram(s, n) == any(windows.count(w) > 1 for w in windows)


def test_distinct_n_pools_sequences_and_never_joins_them():
    assert distinct_n([[1, 2], [1, 2]], 2) == 0.5  # the same bigram in two continuations: 1 unique of 2
    assert distinct_n([[1, 2], [3]], 2) == 1.0  # no bigram (2, 3) across the boundary
    assert math.isnan(distinct_n([[1], []], 2))
    assert has_repeated_ngram([7, 7, 7], 2) and not has_repeated_ngram([7, 8, 7], 2)


def test_ngram_hashes_are_equal_exactly_for_equal_windows():
    """Over every 3-gram of a 4-word vocabulary (64 windows) and ids up to the dictionary's size."""
    stream = [t for gram in product(range(4), repeat=3) for t in gram]
    hashes = ngram_hashes(stream, 3)
    windows = [tuple(stream[i : i + 3]) for i in range(len(stream) - 2)]
    assert len(hashes) == len(windows) and hashes.dtype == np.uint64
    assert len(set(hashes.tolist())) == len(set(windows))
    big = np.random.default_rng(0).integers(0, 33280, size=5000)
    big_windows = {tuple(big[i : i + 8]) for i in range(len(big) - 7)}
    assert len(np.unique(ngram_hashes(big, 8))) == len(big_windows)
    assert len(ngram_hashes([1, 2], 3)) == 0


@pytest.mark.parametrize("seed", range(5))
def test_training_ngrams_found_and_covered_match_brute_force(seed):
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 3, size=60).tolist()
    grams = {tuple(train[i : i + 4]) for i in range(len(train) - 3)}
    index = TrainingNgrams.from_stream(np.array(train), 4)
    assert len(index) == len(grams)
    for tokens in random_sequences(seed + 10, vocab=3):
        windows = [tuple(tokens[i : i + 4]) for i in range(len(tokens) - 3)]
        found = [w in grams for w in windows]
        assert index.found(tokens).tolist() == found
        covered = [any(found[s] for s in range(len(windows)) if s <= i < s + 4) for i in range(len(tokens))]
        assert index.covered(tokens).tolist() == covered
        kept = [f and 0 not in w for f, w in zip(found, windows, strict=True)]  # 0 plays <unk>
        assert index.found(tokens, skip=0).tolist() == kept
        covered = [any(kept[s] for s in range(len(windows)) if s <= i < s + 4) for i in range(len(tokens))]
        assert index.covered(tokens, skip=0).tolist() == covered


def test_training_ngrams_of_a_copy_cover_it_and_of_an_empty_stream_nothing():
    index = TrainingNgrams.from_stream([5, 6, 7, 8, 9, 10], 3)
    assert index.covered([1, 6, 7, 8, 2, 6, 7]).tolist() == [False, True, True, True, False, False, False]
    assert not TrainingNgrams.from_stream([5, 6], 3).covered([5, 6, 7]).any()


def test_bootstrap_ratio_ci_brackets_the_ratio():
    num, den = np.array([1.0, 2.0, 3.0, 10.0]), np.array([4.0, 4.0, 4.0, 4.0])
    low, high = bootstrap_ratio_ci(num, den, resamples=500)
    assert low <= num.sum() / den.sum() <= high and low < high
    assert bootstrap_ratio_ci(np.full(5, 2.0), np.full(5, 4.0)) == (0.5, 0.5)


@pytest.fixture(scope="module")
def tiny_lm(tiny_checkpoint, tiny_data_bin):
    lm, task = load_language_model(tiny_checkpoint, tiny_data_bin)
    return lm.eval(), task.source_dictionary


def test_continuation_logprobs_match_one_forward_per_word(tiny_lm):
    """Right-padded batches of different lengths give what a forward of each prefix alone gives."""
    lm, dictionary = tiny_lm
    eos = dictionary.eos()
    prompts, continuations = [[10, 11, 12], [20], [30, 31, 32, 33, 34]], [[13, 14], [21, 22, 23, 24], [35]]
    got = continuation_logprobs(lm, prompts, continuations, eos=eos, pad=dictionary.pad(), batch_size=2)
    for prompt, continuation, values in zip(prompts, continuations, got, strict=True):
        want = []
        for j, word in enumerate(continuation):
            with torch.no_grad():
                out = lm(torch.tensor([[eos, *prompt, *continuation[:j]]]))
                want.append(float(torch.log_softmax(out[0][0, -1].double(), -1)[word]))
        np.testing.assert_allclose(values, want, rtol=0, atol=1e-5)


def test_choose_windows_spreads_paragraph_starts_and_skips_short_lines():
    eos = 2
    lines = [np.array([*range(10 + i, 10 + i + length), eos]) for i, length in enumerate([3, 9, 10, 2, 12, 9, 20])]
    windows = study.choose_windows(lines, eos, count=3, prompt_len=4, new_tokens=5)
    assert [w[0] for w in windows] == [1, 2, 5]  # of the eligible 1, 2, 4, 5, 6: j·5 // 3 = 0, 1, 3
    assert windows[0][1:] == (list(range(11, 15)), list(range(15, 20)))
    with pytest.raises(KnnlmError, match="only 5 lines hold 9 words"):
        study.choose_windows(lines, eos, count=6, prompt_len=4, new_tokens=5)


def test_decoding_names():
    assert study.decoding_of({"sampling": True, "sampling_topp": 0.9, "sampling_topk": -1}) == "top-p 0.9"
    assert study.decoding_of({"sampling": True, "sampling_topp": -1.0, "sampling_topk": 40}) == "top-k 40"
    assert study.decoding_of({"sampling": False, "beam": 1}) == "greedy"
    assert study.decoding_of({"sampling": False, "beam": 4}) == "beam 4"


def test_prompts_then_summarize_end_to_end(tiny_checkpoint, tiny_data_bin, tmp_path):
    """Prompts of the tiny valid split; a fake generation that copies the human text scores the same."""
    out = tmp_path / "study"
    study.main(["prompts", "--data", str(tiny_data_bin), "--out", str(out), "--prompts", "3",
                "--prompt-len", "4", "--new-tokens", "6"])  # fmt: skip
    references = [json.loads(line) for line in (out / "references.jsonl").read_text().splitlines()]
    assert len(references) == 3 and all(len(r["prompt_tokens"]) == 4 and len(r["tokens"]) == 6 for r in references)
    assert len((out / "prompts.txt").read_text().splitlines()) == 3
    settings = {"lmbda": 0.25, "knn_temp": 2.0, "k": 8, "nprobe": None, "seed": 1, "sampling": False, "beam": 1}
    generation = tmp_path / "greedy.copy.jsonl"
    generation.write_text("".join(
        json.dumps({"prompt_tokens": r["prompt_tokens"], "tokens": r["tokens"], "seconds": 0.5, "stopped": "length",
                    "settings": settings}) + "\n"
        for r in references
    ))  # fmt: skip
    study.main(["summarize", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data_bin),
                "--out", str(out), str(generation)])  # fmt: skip
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    human, copy = rows
    assert human["setting"] == "human" and copy["setting"] == "greedy.copy" and copy["decoding"] == "greedy"
    for key in ("base_ppl", "distinct_1", "distinct_3", "copy8_token_frac", "copy8_no_unk_any_frac", "unk_frac"):
        assert copy[key] == pytest.approx(human[key])
    assert copy["tokens"] == 18 and copy["tokens_per_s"] == pytest.approx(18 / 1.5)
    low, high = human["base_ppl_ci95"]
    assert low <= human["base_ppl"] <= high
    table = (out / "table.md").read_text()
    assert "## greedy" in table and "| human | – | – | – |" in table and "| greedy.copy | 0.25 | 2 | 12 |" in table
    generation.write_text(generation.read_text().splitlines()[0] + "\n")
    with pytest.raises(SystemExit):
        study.main(["summarize", "--checkpoint", str(tiny_checkpoint), "--data", str(tiny_data_bin),
                    "--out", str(out), str(generation)])  # fmt: skip


def test_script_parses_and_explains_itself():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    done = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True)
    assert done.returncode == 0 and "Usage: scripts/generation_study.sh" in done.stdout and "TAU_TUNED" in done.stdout
    bad = subprocess.run([str(SCRIPT), "--decodings", "beam"], capture_output=True, text=True)
    assert bad.returncode == 2 and "a decoding is sample or greedy" in bad.stderr


def test_script_stops_on_a_tau_json_without_a_tuned_tau(tmp_path):
    for name in ("ckpt.pt", "data/dict.txt", "ds/meta.json", "index.faiss.meta.json", "out/references.jsonl"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("{}\n")
    (tmp_path / "temperature.json").write_text(json.dumps({"models": [{"label": "ω=0"}]}))
    args = [str(SCRIPT), "--checkpoint", str(tmp_path / "ckpt.pt"), "--data", str(tmp_path / "data"),
            "--datastore", str(tmp_path / "ds"), "--index", str(tmp_path / "index.faiss"),
            "--tau-json", str(tmp_path / "temperature.json"), "--out", str(tmp_path / "out")]
    done = subprocess.run(args, capture_output=True, text=True, env=with_python_on_path())
    assert done.returncode == 1 and "has no models[0].tuned.tau" in done.stderr
    assert "tuned τ =" not in done.stdout
