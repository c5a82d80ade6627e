"""Target-only LM log-probabilities equal fairseq's full normalized distribution."""

from __future__ import annotations

import pytest
import torch

from knnlm.models.fairseq_lm import output_logprobs
from tests.test_criterion_support import build_lm, make_sample, make_task

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize(
    ("kind", "cutoff"),
    [("knnlm", None), ("knnlm", "12,24"), ("knnlm", "10"), ("stock", None), ("stock", "12,24")],
)
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
