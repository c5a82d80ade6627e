"""``moco_queue`` (Eq. 1): FIFO queues, momentum encoder, gradients, zero-queue equivalence, state."""

from __future__ import annotations

import math
from collections import deque

import pytest
import torch
from fairseq.logging import metrics
from hypothesis import given, settings
from hypothesis import strategies as st

from knnlm.criterions import ActivationL2Criterion, MocoQueueCriterion, WordQueues, queue_bytes
from knnlm.criterions.moco_queue import parameter_fingerprint
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

OMEGA = 0.3


@pytest.fixture(scope="module")
def task():
    return make_task()


def moco(task, **kwargs) -> MocoQueueCriterion:
    options = {"activation_weight": OMEGA, "knn_key": "att", "queue_size": 3, "moco_momentum": 0.9}
    options.update(kwargs)
    return MocoQueueCriterion(task, **options)


def train_step(model, criterion, sample, optimizer, num_updates: int) -> torch.Tensor:
    """What fairseq's trainer and task.train_step do around the criterion."""
    model.train()
    model.set_num_updates(num_updates)
    optimizer.zero_grad()
    loss, _, _ = criterion(model, sample)
    loss.backward()
    optimizer.step()
    return loss.detach()


def bound(task, model, **kwargs) -> MocoQueueCriterion:
    """A criterion that has seen ``model`` once (eval forward: nothing queued, no update)."""
    criterion = moco(task, **kwargs)
    model.eval()
    criterion(model, make_sample(task))
    model.train()
    return criterion


def fill_randomly(criterion: MocoQueueCriterion, words: torch.Tensor, seed: int = 0) -> None:
    """Push 0..L+1 random vectors for each word of ``words`` (some queues partial, some wrapped)."""
    gen = torch.Generator().manual_seed(seed)
    queues = criterion.queues
    for i, word in enumerate(torch.unique(words).tolist()):
        n = i % (queues.size + 2)
        if n:
            queues.push(torch.full((n,), word), torch.randn(n, queues.dim, generator=gen))


# -- the queues ---------------------------------------------------------------------------------


def test_queue_is_fifo_per_word_and_overwrites_the_oldest_slot():
    queues = WordQueues(num_words=5, size=3, dim=2)
    vectors = torch.arange(8, dtype=torch.float32).reshape(4, 2)
    for v in vectors[:3]:
        queues.push(torch.tensor([2]), v[None])
    assert torch.equal(queues.contents(2), vectors[:3]) and int(queues.count[2]) == 3
    queues.push(torch.tensor([2]), vectors[3][None])
    assert torch.equal(queues.values[2, 0], vectors[3])  # slot 0 held the oldest vector
    assert torch.equal(queues.contents(2), vectors[1:])
    assert int(queues.count[3]) == 0 and torch.all(queues.values[3] == 0)  # other words untouched
    queues.push(torch.tensor([3, 2]), torch.tensor([[9.0, 9.0], [7.0, 7.0]]))
    assert torch.equal(queues.contents(3), torch.tensor([[9.0, 9.0]]))
    assert torch.equal(queues.contents(2), torch.cat([vectors[2:], torch.tensor([[7.0, 7.0]])]))


@settings(max_examples=60, deadline=None)
@given(
    size=st.integers(1, 4),
    batches=st.lists(st.lists(st.integers(0, 4), min_size=0, max_size=12), min_size=1, max_size=5),
)
def test_batched_push_equals_pushing_one_vector_at_a_time(size, batches):
    queues = WordQueues(num_words=5, size=size, dim=3)
    reference = {w: deque(maxlen=size) for w in range(5)}
    counter = 0
    for batch in batches:
        words = torch.tensor(batch, dtype=torch.long)
        vectors = torch.arange(counter, counter + 3 * len(batch), dtype=torch.float32).reshape(-1, 3)
        counter += 3 * len(batch)
        queues.push(words, vectors)
        for w, v in zip(batch, vectors, strict=True):
            reference[w].append(v)
    for w in range(5):
        expected = torch.stack(list(reference[w])) if reference[w] else torch.zeros(0, 3)
        assert torch.equal(queues.contents(w), expected)
        assert int(queues.count[w]) == len(reference[w])


def test_stats_use_filled_slots_only():
    queues = WordQueues(num_words=6, size=4, dim=3)
    gen = torch.Generator().manual_seed(0)
    queues.push(torch.tensor([1, 1, 4, 4, 4, 4, 4, 2]), torch.randn(8, 3, generator=gen))
    queues.values[1, 2:] = float("nan")  # unfilled slots of word 1 hold garbage
    queues.values[2, 1:] = 1e6
    words = torch.tensor([1, 4, 2, 3, 1])
    filled, sums, sq_sums = queues.stats(words)
    for j, w in enumerate(words.tolist()):
        contents = queues.contents(w).float()
        assert filled[j] == contents.shape[0]
        torch.testing.assert_close(sums[j], contents.sum(0))
        torch.testing.assert_close(sq_sums[j], (contents**2).sum())


@pytest.mark.parametrize("dtype", ["fp32", "fp16", "bf16"])
def test_storage_dtype_survives_the_trainers_half_cast(task, dtype):
    criterion = bound(task, build_lm(task, dtype=torch.float32), queue_dtype=dtype)
    criterion.queues.push(torch.tensor([5, 6]), torch.tensor([[0.1] * 16, [-2.5] * 16]))
    before = criterion.queues.values.clone()
    criterion.half()  # fairseq's Trainer does this under --fp16
    assert criterion.queues.dtype_name == dtype and criterion.queues.values.dtype == before.dtype
    assert torch.equal(criterion.queues.values, before)
    assert criterion.queues.bits.element_size() == (4 if dtype == "fp32" else 2)


def test_queue_memory_is_v_l_d_bytes_and_the_budget_is_enforced(task):
    assert queue_bytes(267_744, 16, 1024, "fp16") == 267_744 * 16 * 1024 * 2
    assert queue_bytes(267_744, 1, 1024, "fp32") == 267_744 * 1024 * 4
    model = build_lm(task)
    criterion = moco(task, queue_size=8, queue_max_gib=40 * 8 * 16 * 4 / 2**30 * 0.99)
    with pytest.raises(KnnlmError, match=r"44 words x 8 slots x 16 dims x 4 bytes .*--queue-max-gib"):
        criterion(model, make_sample(task))
    moco(task, queue_size=8, queue_max_gib=44 * 8 * 16 * 4 / 2**30)(model, make_sample(task))


# -- loss and gradients ---------------------------------------------------------------------------


def brute_force_penalty(criterion, r: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """Σ_j Σ_{i filled} ||q_i − r_j||², one slot at a time."""
    total = r.new_zeros(())
    for j, w in enumerate(words.tolist()):
        for q in criterion.queues.contents(w):
            total = total + ((q.to(r.dtype) - r[j]) ** 2).sum()
    return total


def test_loss_is_cross_entropy_plus_queue_distances_over_filled_slots(task):
    model, sample = build_lm(task), make_sample(task)
    criterion = bound(task, model)
    mask = sample["target"].ne(task.target_dictionary.pad())
    fill_randomly(criterion, sample["target"][mask])
    model.eval()
    with retained_keys(model, "att") as seen:
        loss, _, log = criterion(model, sample)
    ce = ActivationL2Criterion(task, 0.0)(model, sample)[0]
    expected = brute_force_penalty(criterion, seen[0].detach()[mask], sample["target"][mask])
    assert expected > 0 and 0 < log["queue_fill"] < 3 * mask.sum()
    torch.testing.assert_close(log["queue_sq_dist"], expected, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(loss.detach(), ce.detach() + OMEGA * expected, rtol=1e-6, atol=0)


def test_gradients_match_hand_derivation_on_key_and_parameters(task):
    """d/dr_j = 2ωΣ_i(r_j − q_i); through r = γ⊙x̂ + β: ∂/∂β = Σ_j d/dr_j, ∂/∂γ = Σ_j d/dr_j ⊙ x̂_j."""
    model, sample = build_lm(task), make_sample(task)
    mask = sample["target"].ne(task.target_dictionary.pad())
    words = sample["target"][mask]
    criterion = bound(task, model)
    fill_randomly(criterion, words)
    model.eval()  # nothing is queued, so both passes see the same queues
    norm = key_layer_norm(model, "att")
    results = {}
    for omega in (OMEGA, 0.0):
        criterion.activation_weight = omega
        model.zero_grad()
        with retained_keys(model, "att") as seen:
            loss, _, _ = criterion(model, sample)
            loss.backward()
        results[omega] = (seen[0].grad.clone(), norm.bias.grad.clone(), norm.weight.grad.clone())
        r_full = seen[0].detach()
    r = r_full[mask]
    d_r = torch.stack(
        [
            2 * OMEGA * sum((r[j] - q.double() for q in criterion.queues.contents(w)), torch.zeros_like(r[j]))
            for j, w in enumerate(words.tolist())
        ]
    )
    d_key, d_bias, d_weight = (a - b for a, b in zip(results[OMEGA], results[0.0], strict=True))
    torch.testing.assert_close(d_key[mask], d_r, rtol=1e-9, atol=1e-10)
    assert torch.all(d_key[~mask] == 0)
    x_hat = (r - norm.bias.detach()) / norm.weight.detach()
    torch.testing.assert_close(d_bias, d_r.sum(0), rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(d_weight, (d_r * x_hat).sum(0), rtol=1e-9, atol=1e-10)


def test_zero_queue_with_one_filled_slot_is_exactly_activation_l2(task):
    """The paper's simplification: Q = 0 (all slots filled, L = 1) gives Eq. 2, bit for bit."""
    model, sample = build_lm(task), make_sample(task)
    criterion = bound(task, model, queue_size=1)
    criterion.queues.count.fill_(1)  # every queue full of zeros
    model.eval()
    loss, size, log = criterion(model, sample)
    loss.backward()
    moco_grads = grads(model)
    model.zero_grad()
    reference, ref_size, ref_log = ActivationL2Criterion(task, OMEGA)(model, sample)
    reference.backward()
    assert size == ref_size and torch.equal(loss, reference)
    assert torch.equal(log["penalty"], ref_log["penalty"])
    reference_grads = grads(model)
    assert moco_grads.keys() == reference_grads.keys()
    for name, grad in reference_grads.items():
        assert torch.equal(moco_grads[name], grad), name


def test_zero_queue_with_l_filled_slots_is_activation_l2_with_l_times_the_weight(task):
    model, sample = build_lm(task), make_sample(task)
    criterion = bound(task, model, queue_size=3)
    criterion.queues.count.fill_(3)
    model.eval()
    loss = criterion(model, sample)[0]
    torch.testing.assert_close(loss, ActivationL2Criterion(task, 3 * OMEGA)(model, sample)[0], rtol=1e-6, atol=0)


def test_same_batch_twice_gives_the_same_per_token_loss(task):
    # fp32 sums over another batch layout run in another BLAS reduction order: equal to ~1e-7, not bitwise
    model, sample = build_lm(task), make_sample(task)
    criterion = bound(task, model)
    fill_randomly(criterion, sample["target"].reshape(-1))
    model.eval()
    one, size1, _ = criterion(model, sample)
    two, size2, _ = criterion(model, duplicate(sample))
    assert size2 == 2 * size1
    torch.testing.assert_close(two / size2, one / size1, rtol=1e-6, atol=0)


# -- momentum encoder and queue updates ---------------------------------------------------------


def momentum_keys_by_hand(criterion, sample) -> torch.Tensor:
    encoder = criterion.momentum_encoder
    with torch.no_grad():
        _, extra = encoder(**sample["net_input"], features_only=True)
    return extra["att"]


def test_momentum_encoder_is_an_independent_copy_with_its_own_key_capture(task):
    model, sample = build_lm(task), make_sample(task)
    state_keys, modules = set(model.state_dict()), len(list(model.modules()))
    criterion = moco(task)
    criterion(model, sample)
    encoder = criterion.momentum_encoder
    assert encoder is not model and encoder.key_capture is not model.key_capture
    for p_k, p_q in zip(encoder.parameters(), model.parameters(), strict=True):
        assert torch.equal(p_k, p_q) and p_k.data_ptr() != p_q.data_ptr() and not p_k.requires_grad
    # the model gets no new submodules or state-dict keys (its checkpoints are unchanged)
    assert len(list(model.modules())) == modules and set(model.state_dict()) == state_keys
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    keys = momentum_keys_by_hand(criterion, sample)
    assert model.key_capture._store == {} and encoder.key_capture._store == {}
    online = model(**sample["net_input"])[1]["att"]
    assert not torch.allclose(keys, online)
    assert torch.equal(keys, momentum_keys_by_hand(criterion, sample))


def dyadic_(module: torch.nn.Module, seed: int) -> None:
    """Parameters set to multiples of 1/8, so that an update with m = 0.75 is exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randint(-16, 16, p.shape, generator=gen).to(p.dtype) / 8)


def test_momentum_update_is_exact_and_happens_once_per_weight_change(task):
    """θ_k ← m·θ_k + (1 − m)·θ_q after each optimizer step; none for micro-batches or skipped steps."""
    model, sample = build_lm(task), make_sample(task)
    criterion = bound(task, model, moco_momentum=0.75)
    encoder = criterion.momentum_encoder

    def params(module):
        return [p.detach().clone() for p in module.parameters()]

    def same(a, b):
        return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))

    dyadic_(encoder, seed=1)
    theta_k = params(encoder)
    model.train()
    criterion(model, sample)  # weights unchanged since the criterion first saw them: no update
    assert same(params(encoder), theta_k)
    dyadic_(model, seed=2)  # an optimizer step
    theta_q = params(model)
    model.eval()
    criterion(model, sample)  # validation forwards never update
    assert same(params(encoder), theta_k)
    model.train()
    criterion(model, sample)
    expected = [0.75 * k + 0.25 * q for k, q in zip(theta_k, theta_q, strict=True)]
    assert same(params(encoder), expected)
    model.set_num_updates(7)
    criterion(model, sample)  # next micro-batch of the step, or a step skipped for fp16 overflow
    assert same(params(encoder), expected)
    dyadic_(model, seed=3)
    theta_q = params(model)
    criterion(model, sample)
    expected = [0.75 * k + 0.25 * q for k, q in zip(expected, theta_q, strict=True)]
    assert same(params(encoder), expected)
    assert torch.equal(criterion.updated_from, parameter_fingerprint(model))


def test_training_forward_queues_momentum_keys_of_targets_in_batch_order(task):
    model, sample = build_lm(task), make_sample(task, batch=4, length=10, pad_rows=2)
    criterion = moco(task, queue_size=40)
    target, pad = sample["target"], task.target_dictionary.pad()
    model.eval()
    criterion(model, sample)
    assert int(criterion.queues.count.sum()) == 0  # validation queues nothing
    model.train()
    loss, _, log = criterion(model, sample)
    assert log["queue_fill"] == 0 and log["penalty"] == 0  # the loss saw the queues before this batch
    keys = momentum_keys_by_hand(criterion, sample)
    assert int(criterion.queues.count[pad]) == 0
    assert int(criterion.queues.count.sum()) == int(target.ne(pad).sum())
    for w in torch.unique(target[target.ne(pad)]).tolist():
        torch.testing.assert_close(criterion.queues.contents(w), keys[target.eq(w)].float())
    _, _, log = criterion(model, sample)
    assert log["queue_fill"] > 0 and log["penalty"] > 0


@pytest.mark.parametrize("key", ["att", "ffn"])
def test_stock_transformer_lm_queues_keys_read_through_hooks(task, key):
    model, sample = build_lm(task, kind="stock"), make_sample(task)
    criterion = moco(task, knn_key=key, queue_size=40)
    criterion(model, sample)
    assert criterion.queues.dim == (16 if key == "att" else 24)
    with KeyCapture(criterion.momentum_encoder.decoder) as capture, torch.no_grad():
        criterion.momentum_encoder(**sample["net_input"])
        keys = capture.pop(key)
    target = sample["target"]
    for w in torch.unique(target[target.ne(task.target_dictionary.pad())]).tolist():
        torch.testing.assert_close(criterion.queues.contents(w), keys[target.eq(w)].float())
    loss, _, log = criterion(model, sample)
    loss.backward()
    assert log["penalty"] > 0


def test_fp16_model_gets_an_fp32_momentum_encoder_and_loss(task):
    model, sample = build_lm(task, dtype=torch.float16), make_sample(task)
    criterion = moco(task, queue_dtype="bf16").half()  # as fairseq's Trainer does under --fp16
    for step in range(2):
        model.set_num_updates(step)
        loss, _, _ = criterion(model, sample)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.dtype == torch.float32 for p in criterion.momentum_encoder.parameters())
    assert criterion.queues.values.dtype == torch.bfloat16 and int(criterion.queues.count.sum()) > 0


# -- checkpoint state ---------------------------------------------------------------------------------


def test_state_restored_before_the_first_forward_continues_exactly(task):
    """What a fairseq resume does: load_state_dict on a fresh criterion, then the next step."""
    samples = [make_sample(task, seed=s) for s in range(5)]
    model = build_lm(task)
    criterion = moco(task)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        train_step(model, criterion, samples[step], optimizer, step)
    saved_criterion = {k: v.clone() for k, v in criterion.state_dict().items() if torch.is_tensor(v)}
    saved_criterion.update({k: v for k, v in criterion.state_dict().items() if not torch.is_tensor(v)})
    saved_model = {k: v.clone() for k, v in model.state_dict().items()}
    straight = [train_step(model, criterion, samples[s], optimizer, s) for s in (3, 4)]

    resumed_model = build_lm(task, seed=99)
    resumed_model.load_state_dict(saved_model)
    resumed = moco(task)
    assert resumed.state_anchor.numel() == 0 and len(list(resumed.parameters())) == 1
    resumed.load_state_dict(saved_criterion)
    assert set(resumed.state_dict()) == set(saved_criterion)  # kept as is until the first forward
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05)
    again = [train_step(resumed_model, resumed, samples[s], resumed_optimizer, s) for s in (3, 4)]
    assert all(torch.equal(a, b) for a, b in zip(straight, again, strict=True))
    for (name, a), b in zip(criterion.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.equal(a, b) if torch.is_tensor(a) else a == b, name
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        assert torch.equal(a, b)


def test_restoring_a_state_of_other_shapes_is_refused(task):
    model, sample = build_lm(task), make_sample(task)
    small = moco(task, queue_size=2)
    small(model, sample)
    other = moco(task, queue_size=3)
    other.load_state_dict(small.state_dict())
    with pytest.raises(KnnlmError, match="queue-size"):
        other(build_lm(task), sample)


def test_checkpoint_without_criterion_state_starts_fresh(task):
    criterion = moco(task)
    criterion.load_state_dict(None)  # fairseq passes None when the checkpoint's criterion had no state
    criterion.load_state_dict({"state_anchor": torch.zeros(0)})
    criterion(build_lm(task), make_sample(task))
    assert int(criterion.queues.count.sum()) > 0


def test_data_parallel_training_is_refused(task):
    with pytest.raises(KnnlmError, match="update-freq"):
        moco(task, distributed_world_size=2)
    with pytest.raises(KnnlmError, match="queue-dtype"):
        moco(task, queue_dtype="int8")


def test_queue_metrics_are_logged_per_token(task):
    model, sample = build_lm(task), make_sample(task)
    criterion = moco(task)
    criterion(model, sample)
    _, size, log = criterion(model, sample)
    with metrics.aggregate() as agg:
        MocoQueueCriterion.reduce_metrics([log])
    values = agg.get_smoothed_values()
    assert values["queue_fill"] == pytest.approx(float(log["queue_fill"]) / size, abs=1e-3)
    assert values["queue_sq_dist"] == pytest.approx(float(log["queue_sq_dist"]) / size, abs=1e-3)
    assert values["loss"] == pytest.approx(float(log["loss"]) / size / math.log(2), abs=1e-3)
