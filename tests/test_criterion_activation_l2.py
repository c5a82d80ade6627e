"""``activation_l2`` (Eq. 2): value, hand-derived gradients, padding, scaling, softmax kinds, fp16, logs."""

from __future__ import annotations

import math

import pytest
import torch
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.logging import metrics

from knnlm.criterions import ActivationL2Criterion
from knnlm.errors import KnnlmError
from knnlm.models import KeyCapture

from .test_criterion_support import (
    build_lm,
    duplicate,
    grads,
    key_layer_norm,
    make_sample,
    make_task,
    retained_keys,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

OMEGA = 0.7


@pytest.fixture(scope="module")
def task():
    return make_task()


def reference_keys(model, sample, key):
    """The key of every position, read with an independent hook capture."""
    with KeyCapture(model.decoder) as capture, torch.no_grad():
        model(**sample["net_input"])
        return capture.pop(key)


@pytest.mark.parametrize("key", ["att", "ffn"])
def test_loss_is_cross_entropy_plus_weighted_squared_norm_of_non_pad_keys(task, key):
    model, sample = build_lm(task), make_sample(task)
    loss, sample_size, log = ActivationL2Criterion(task, OMEGA, key)(model, sample)
    ce, ce_size, _ = CrossEntropyCriterion(task, sentence_avg=False)(model, sample)
    mask = sample["target"].ne(task.target_dictionary.pad())
    r = reference_keys(model, sample, key)
    assert sample_size == ce_size == int(mask.sum()) == sample["ntokens"]
    torch.testing.assert_close(log["loss"], ce.detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(log["key_sq_norm"], (r[mask] ** 2).sum())
    torch.testing.assert_close(loss.detach(), ce.detach() + OMEGA * (r[mask] ** 2).sum(), rtol=1e-6, atol=0)


@pytest.mark.parametrize("key", ["att", "ffn"])
def test_gradient_on_key_is_two_omega_r_and_zero_at_padding(task, key):
    """d/dr of ω·Σ||r||² is 2ωr: the loss gradient on the captured key minus the CE-only gradient."""
    model, sample = build_lm(task), make_sample(task)
    mask = sample["target"].ne(task.target_dictionary.pad())
    key_grads = []
    for omega in (OMEGA, 0.0):
        with retained_keys(model, key) as seen:
            loss, _, _ = ActivationL2Criterion(task, omega, key)(model, sample)
            loss.backward()
        key_grads.append(seen[0].grad)
        r = seen[0].detach()
    model.zero_grad()
    expected = 2 * OMEGA * r * mask[..., None]
    torch.testing.assert_close(key_grads[0] - key_grads[1], expected, rtol=1e-10, atol=1e-12)
    assert (~mask).any() and torch.all((key_grads[0] - key_grads[1])[~mask] == 0)


@pytest.mark.parametrize("key", ["att", "ffn"])
def test_parameter_gradients_follow_the_hand_derived_chain(task, key):
    """r = γ⊙x̂ + β (the LayerNorm that outputs the key): ∂/∂β = 2ωΣ_j r_j, ∂/∂γ = 2ωΣ_j r_j⊙x̂_j."""
    model, sample = build_lm(task), make_sample(task)
    mask = sample["target"].ne(task.target_dictionary.pad())
    norm = key_layer_norm(model, key)
    delta = {}
    for omega in (OMEGA, 0.0):
        model.zero_grad()
        with retained_keys(model, key) as seen:
            loss, _, _ = ActivationL2Criterion(task, omega, key)(model, sample)
            loss.backward()
        delta[omega] = (norm.bias.grad.clone(), norm.weight.grad.clone())
        r = seen[0].detach()[mask]
    x_hat = (r - norm.bias.detach()) / norm.weight.detach()
    torch.testing.assert_close(delta[OMEGA][0] - delta[0.0][0], 2 * OMEGA * r.sum(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(delta[OMEGA][1] - delta[0.0][1], 2 * OMEGA * (r * x_hat).sum(0), rtol=1e-9, atol=1e-10)


def test_zero_weight_is_plain_cross_entropy_in_value_and_gradient(task):
    model, sample = build_lm(task), make_sample(task)
    loss, _, _ = ActivationL2Criterion(task, 0.0)(model, sample)
    loss.backward()
    ours = grads(model)
    model.zero_grad()
    ce, _, _ = CrossEntropyCriterion(task, sentence_avg=False)(model, sample)
    ce.backward()
    torch.testing.assert_close(loss, ce, rtol=1e-6, atol=0, check_dtype=False)
    for name, grad in grads(model).items():
        torch.testing.assert_close(ours[name], grad, rtol=1e-5, atol=1e-7)


def test_padding_is_masked(task):
    """Changing what sits at padded positions changes neither the loss nor the token count."""
    model = build_lm(task)
    sample = make_sample(task, pad_rows=2)
    base, size, _ = ActivationL2Criterion(task, OMEGA)(model, sample)
    pad = task.target_dictionary.pad()
    other = make_sample(task, pad_rows=2)
    assert sample["target"].eq(pad).sum() > 0
    # same real tokens; the pads of the source become arbitrary words (later context of padded rows)
    src = other["net_input"]["src_tokens"]
    src[src.eq(pad)] = 7
    loss, size2, _ = ActivationL2Criterion(task, OMEGA)(model, other)
    assert size == size2 == sample["ntokens"]
    torch.testing.assert_close(loss, base, rtol=1e-6, atol=0)


def test_same_batch_twice_gives_the_same_per_token_loss(task):
    # fp32 sums over another batch layout run in another BLAS reduction order: equal to ~1e-7, not bitwise
    model, sample = build_lm(task), make_sample(task)
    criterion = ActivationL2Criterion(task, OMEGA)
    one, size1, log1 = criterion(model, sample)
    two, size2, log2 = criterion(model, duplicate(sample))
    assert size2 == 2 * size1
    torch.testing.assert_close(two / size2, one / size1, rtol=1e-6, atol=0)
    torch.testing.assert_close(log2["penalty"] / size2, log1["penalty"] / size1, rtol=1e-6, atol=0)


def test_sentence_avg_divides_by_sentences(task):
    model, sample = build_lm(task), make_sample(task)
    loss, size, log = ActivationL2Criterion(task, OMEGA, sentence_avg=True)(model, sample)
    assert size == sample["nsentences"] and log["ntokens"] == sample["ntokens"]


def test_unreduced_loss_is_per_position_and_sums_to_the_reduced_one(task):
    model, sample = build_lm(task), make_sample(task)
    criterion = ActivationL2Criterion(task, OMEGA)
    reduced, _, _ = criterion(model, sample)
    per_position, _, _ = criterion(model, sample, reduce=False)
    mask = sample["target"].ne(task.target_dictionary.pad()).reshape(-1)
    assert per_position.shape == mask.shape and torch.all(per_position[~mask] == 0)
    torch.testing.assert_close(per_position.sum(), reduced, rtol=1e-6, atol=0)  # CE is summed in fp32


def test_adaptive_softmax_cross_entropy_is_the_exact_nll(task):
    """CE through the adaptive softmax equals -Σ log p(target) of its full distribution."""
    model = build_lm(task, adaptive_cutoff="12,24")
    assert model.decoder.adaptive_softmax is not None
    sample = make_sample(task, batch=4, length=12)
    target, pad = sample["target"], task.target_dictionary.pad()
    loss, size, log = ActivationL2Criterion(task, OMEGA)(model, sample)
    with torch.no_grad():
        lprobs = model.get_normalized_probs(model(**sample["net_input"]), log_probs=True)
    exact = -lprobs.gather(-1, target[..., None]).squeeze(-1)[target.ne(pad)].sum()
    r = reference_keys(model, sample, "att")[target.ne(pad)]
    assert size == int(target.ne(pad).sum())
    torch.testing.assert_close(log["loss"], exact, rtol=1e-6, atol=0)
    torch.testing.assert_close(loss.detach(), log["loss"] + OMEGA * (r**2).sum(), rtol=1e-6, atol=0)
    per_position, _, _ = ActivationL2Criterion(task, OMEGA)(model, sample, reduce=False)
    torch.testing.assert_close(per_position.sum(), loss, rtol=1e-6, atol=0)


def test_fairseq_adaptive_loss_drops_tail_words_whose_cluster_index_equals_pad(task):
    """fairseq's adaptive_loss passes ignore_index=pad to the tail clusters too, so a tail word
    with in-cluster index 1 (ids 13 and 25 here; 2001 and 10001 with cutoffs 2000,10000) gets no
    loss there. activation_l2 with ω=0 counts it: compare ω=0 runs with ω=0 runs, not adaptive_loss."""
    model = build_lm(task, adaptive_cutoff="12,24")
    sample = make_sample(task, batch=4, length=12)
    dropped = [12 + task.target_dictionary.pad(), 24 + task.target_dictionary.pad()]
    assert torch.isin(sample["target"], torch.tensor(dropped)).any()
    ours = ActivationL2Criterion(task, 0.0)(model, sample)[0]
    theirs = AdaptiveLoss(task, sentence_avg=False)(model, sample)[0].reshape(())
    assert theirs < ours - 1
    for bad in dropped:  # without those words the two agree
        sample["target"][sample["target"].eq(bad)] = 5
    ours = ActivationL2Criterion(task, 0.0)(model, sample)[0]
    theirs = AdaptiveLoss(task, sentence_avg=False)(model, sample)[0].reshape(())
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=0)


def test_adaptive_softmax_refuses_pytorch_ddp_only_when_data_parallel(task):
    model, sample = build_lm(task, adaptive_cutoff="12,24"), make_sample(task)
    ActivationL2Criterion(task, OMEGA, ddp_backend="pytorch_ddp", distributed_world_size=1)(model, sample)
    criterion = ActivationL2Criterion(task, OMEGA, ddp_backend="pytorch_ddp", distributed_world_size=2)
    with pytest.raises(KnnlmError, match="legacy_ddp"):
        criterion(model, sample)


@pytest.mark.parametrize("key", ["att", "ffn"])
def test_stock_transformer_lm_gets_keys_through_hooks(task, key):
    """Same weights in a stock transformer_lm and a knnlm model: same loss, same gradients."""
    stock = build_lm(task, kind="stock")
    assert stock.decoder.project_out_dim is not None  # the ffn key is the projection's output
    sample = make_sample(task)
    criterion = ActivationL2Criterion(task, OMEGA, key)
    loss, _, log = criterion(stock, sample)
    loss.backward()
    r = reference_keys(stock, sample, key)[sample["target"].ne(task.target_dictionary.pad())]
    torch.testing.assert_close(log["key_sq_norm"], (r**2).sum())
    # the criterion's capture is reused on later forwards and holds nothing between them
    loss2, _, _ = criterion(stock, sample)
    torch.testing.assert_close(loss2, loss)
    assert len(criterion._captures) == 1
    (capture,) = criterion._captures.values()
    assert capture._store == {}


def test_fp16_model_gets_an_fp32_loss_and_penalty(task):
    """Keys whose squared norms overflow fp16 still give a finite fp32 penalty."""
    model = build_lm(task, dtype=torch.float16)
    with torch.no_grad():
        key_layer_norm(model, "att").weight.fill_(60.0)  # ||r||² ≈ 16·3600 per token, > fp16 max in sum
    sample = make_sample(task)
    loss, _, log = ActivationL2Criterion(task, OMEGA)(model, sample)
    r = reference_keys(model, sample, "att")[sample["target"].ne(task.target_dictionary.pad())]
    assert r.dtype == torch.float16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    expected = (r.float() ** 2).sum()
    assert expected > torch.finfo(torch.float16).max
    torch.testing.assert_close(log["key_sq_norm"], expected)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_logged_loss_is_pure_cross_entropy_and_penalty_is_separate(task):
    model, sample = build_lm(task), make_sample(task)
    _, size, log = ActivationL2Criterion(task, OMEGA)(model, sample)
    with metrics.aggregate() as agg:
        ActivationL2Criterion.reduce_metrics([log, log])
    values = agg.get_smoothed_values()
    ce_per_token = float(log["loss"]) / size
    assert values["loss"] == pytest.approx(ce_per_token / math.log(2), abs=1e-3)
    assert values["ppl"] == pytest.approx(2 ** (ce_per_token / math.log(2)), rel=1e-2)
    assert values["penalty"] == pytest.approx(float(log["penalty"]) / size, abs=1e-4)
    assert values["key_sq_norm"] == pytest.approx(float(log["key_sq_norm"]) / size, abs=1e-3)
    assert ActivationL2Criterion.logging_outputs_can_be_summed()


def test_bad_options_are_refused(task):
    with pytest.raises(KnnlmError, match="knn-key"):
        ActivationL2Criterion(task, OMEGA, "hidden")
    with pytest.raises(KnnlmError, match="activation-weight"):
        ActivationL2Criterion(task, -1.0)
