"""Target-only LM log-probabilities equal fairseq's full normalized distribution."""

from __future__ import annotations

import pytest
import torch

from knnlm.models.fairseq_lm import output_logprobs
from knnlm.softmax_alternatives.base import output_log_probs, output_target_log_probs
from tests.test_criterion_support import build_lm, make_sample, make_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


LAYOUTS = pytest.mark.parametrize(
    ("kind", "cutoff"),
    [("knnlm", None), ("knnlm", "12,24"), ("knnlm", "10"), ("stock", None), ("stock", "12,24")],
)


@LAYOUTS
def test_target_logprobs_equal_the_full_distribution(kind, cutoff):
    task = make_task(num_words=40)
    model = build_lm(task, kind=kind, adaptive_cutoff=cutoff).eval()
    sample = make_sample(task, batch=4, length=12, pad_rows=0)
    tokens, targets = sample["net_input"]["src_tokens"], sample["target"]
    # every cluster is hit: the head, each tail, the first and last word of each range
    targets[0, :6] = torch.tensor([4, 11, 12, 23, 24, len(task.target_dictionary) - 1])
    with torch.no_grad():
        net_output = model(tokens)
        full = model.get_normalized_probs(net_output, log_probs=True)
        rows, cols = torch.nonzero(torch.ones_like(targets, dtype=torch.bool), as_tuple=True)
        rows, cols = rows[1::2], cols[1::2]  # a subset of positions, as the dump scores only some
        got = output_logprobs(model.decoder, net_output[0][rows, cols], targets[rows, cols])
    want = full[rows, cols, targets[rows, cols]]
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)


@LAYOUTS
def test_base_target_log_probs_from_ffn_features_equal_the_whole_distribution(kind, cutoff):
    """What the replacement heads' interpolated objective reads: the base at the targets, [B, T]."""
    task = make_task(num_words=40)
    model = build_lm(task, kind=kind, dtype=torch.float32, adaptive_cutoff=cutoff).eval()  # a base as loaded
    sample = make_sample(task, batch=3, length=12, pad_rows=0, seed=1)
    targets = sample["target"]
    targets[0, :6] = torch.tensor([4, 11, 12, 23, 24, len(task.target_dictionary) - 1])
    with torch.no_grad():
        features, _ = model.decoder.extract_features(sample["net_input"]["src_tokens"], None)
        got = output_target_log_probs(model.decoder, features, targets)
        want = output_log_probs(model.decoder, features).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert got.shape == targets.shape and got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-6, atol=1e-6)
