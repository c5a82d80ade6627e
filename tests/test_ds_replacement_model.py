"""The fairseq model and criterion of the datastore replacements, on a tiny frozen base LM."""

from __future__ import annotations

import math

import pytest
import torch

from knnlm.softmax_alternatives.base import output_linear_map, output_log_probs
from knnlm.softmax_alternatives.criterion import DatastoreReplacementCriterion
from knnlm.softmax_alternatives.model import (
    DatastoreReplacementConfig,
    DatastoreReplacementLM,
    load_frozen_base,
)
from tests.conftest import run_module


@pytest.fixture(scope="module")
def base_task(tiny_checkpoint, tiny_data_bin):
    from fairseq import checkpoint_utils

    from knnlm.models.loading import fairseq_hydra_compat

    with fairseq_hydra_compat():
        models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
            [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
        )
    return models[0].eval(), task


def _build(task, checkpoint, **overrides) -> DatastoreReplacementLM:
    cfg = DatastoreReplacementConfig(base_checkpoint=str(checkpoint), **overrides)
    return DatastoreReplacementLM.build_model(cfg, task)


def _sample(task, n_tokens: int = 40, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    vocab = len(task.target_dictionary)
    tokens = torch.randint(task.target_dictionary.nspecial, vocab, (2, n_tokens + 1), generator=g)
    return {"net_input": {"src_tokens": tokens[:, :-1]}, "target": tokens[:, 1:]}


def test_n1_head_initialised_from_w_sm_on_ffn_reproduces_the_base_lm(base_task, tiny_checkpoint):
    base, task = base_task
    model = _build(task, tiny_checkpoint, ds_key="ffn", ds_n=1, ds_init="lm", ds_init_noise=0.0).eval()
    sample = _sample(task)
    src = sample["net_input"]["src_tokens"]
    with torch.no_grad():
        expected = base.get_normalized_probs(base(src), log_probs=True)
        got = model.get_normalized_probs(model(src), log_probs=True)
    assert output_linear_map(base.decoder)[2], "the tiny base has a plain softmax: the map is exact"
    torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)
    # the criterion's CE is then the base LM's CE
    crit = DatastoreReplacementCriterion(task)
    loss, ntokens, _ = crit(model, sample)
    base_nll = -expected.gather(-1, sample["target"].unsqueeze(-1)).sum()
    assert float(loss) == pytest.approx(float(base_nll), rel=1e-5)


def test_training_leaves_the_frozen_base_bit_identical(base_task, tiny_checkpoint):
    _, task = base_task
    torch.manual_seed(0)
    model = _build(task, tiny_checkpoint, ds_key="att", ds_n=2)
    before = {k: v.clone() for k, v in model.base.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    # every parameter is handed to the optimizer, with weight decay: frozen ones must still not move
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    crit = DatastoreReplacementCriterion(task, ds_loss="interpolated", ds_loss_lambda=0.25)
    model.train()
    assert not model.base.training, "the frozen base stays in eval mode (no dropout)"
    for step in range(3):
        loss, _, log = crit(model, _sample(task, seed=step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert math.isfinite(float(log["nll_loss"]))
    after = model.base.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(head_before, model.head.weight.detach())
    assert all(not p.requires_grad for p in model.base.parameters())
    assert "base.decoder.embed_tokens.weight" not in model.state_dict()


def test_every_objective_by_hand(base_task, tiny_checkpoint):
    """ce and interpolated read the head's targets alone: they must equal the whole distribution's."""
    _, task = base_task
    torch.manual_seed(1)
    model = _build(task, tiny_checkpoint, ds_key="att", ds_n=2, ds_init="random").eval()
    sample = _sample(task, seed=3)
    out = model(**sample["net_input"])
    head = out[0].double()
    base = output_log_probs(model.base.decoder, out[1]["ffn"]).double()
    y = sample["target"].unsqueeze(-1)
    lam = 0.25
    interp = -torch.log((1 - lam) * base.gather(-1, y).exp() + lam * head.gather(-1, y).exp()).sum()
    distill = -(base.exp() * head).sum()
    ce = -head.gather(-1, y).sum()
    got_ce = DatastoreReplacementCriterion(task, "ce")(model, sample)[0]
    assert float(got_ce) == pytest.approx(float(ce), rel=1e-5)
    got_interp = DatastoreReplacementCriterion(task, "interpolated", lam)(model, sample)[0]
    got_distill = DatastoreReplacementCriterion(task, "distill")(model, sample)[0]
    assert float(got_interp) == pytest.approx(float(interp), rel=1e-5)
    assert float(got_distill) == pytest.approx(float(distill), rel=1e-5)


def test_fairseq_train_then_load_keeps_the_checkpoint_head_only(tiny_checkpoint, tiny_data_bin, tmp_path):
    from fairseq import checkpoint_utils

    from knnlm.models.loading import fairseq_hydra_compat

    save = tmp_path / "head"
    knnlm_dir = str(__import__("knnlm").__path__[0])
    run_module(
        "fairseq_cli.train",
        [
            str(tiny_data_bin), "--user-dir", knnlm_dir, "--task", "language_modeling",
            "--arch", "knnlm_ds_replacement", "--base-checkpoint", str(tiny_checkpoint),
            "--ds-key", "ffn", "--ds-n", "3", "--criterion", "ds_replacement", "--ds-loss", "distill",
            "--tokens-per-sample", "64", "--max-tokens", "512", "--optimizer", "adam", "--lr", "0.001",
            "--max-update", "3", "--save-dir", str(save), "--no-epoch-checkpoints", "--no-progress-bar",
            "--seed", "1", "--cpu", "--num-workers", "0", "--no-save-optimizer-state",
        ],
    )
    state = torch.load(save / "checkpoint_last.pt", weights_only=False)
    assert not [k for k in state["model"] if k.startswith("base.")]
    assert state["model"]["head.weight"].shape[0] == 3 * state["model"]["head.row_word"].max().add(1).item()
    with fairseq_hydra_compat():
        models, _cfg, _task = checkpoint_utils.load_model_ensemble_and_task(
            [str(save / "checkpoint_last.pt")], arg_overrides={"data": str(tiny_data_bin)}
        )
    model = models[0]
    base = load_frozen_base(str(tiny_checkpoint), str(tiny_data_bin))
    loaded, fresh = model.base.state_dict(), base.state_dict()
    assert loaded.keys() == fresh.keys() and all(torch.equal(loaded[k], fresh[k]) for k in fresh)
    torch.testing.assert_close(model.head.weight, state["model"]["head.weight"])


def test_mos_and_cluster_heads_build_on_the_frozen_base(base_task, tiny_checkpoint, tmp_path):
    import numpy as np

    from knnlm.errors import KnnlmError
    from knnlm.softmax_alternatives.clusters import save_clusters

    _, task = base_task
    vocab = len(task.target_dictionary)
    sample = _sample(task)
    for train_output in (False, True):
        model = _build(task, tiny_checkpoint, ds_kind="mos", ds_key="ffn", mos_components=3,
                       mos_train_output=train_output)
        lp = model(**sample["net_input"])[0]
        torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]), rtol=1e-4, atol=1e-4)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert ("head.output_weight" in trainable) == train_output
        assert all(n.startswith("head.") for n in trainable)
    dim = model.base.decoder.layers[-1].fc1.in_features
    rng = np.random.default_rng(0)
    rows = np.arange(6).repeat(2)
    cols = rng.integers(4, vocab, size=12)
    save_clusters(tmp_path / "c", rng.normal(size=(6, dim)).astype(np.float32), rows, cols, np.full(12, 0.5),
                  {"vocab_size": vocab, "key_type": "att", "similarity": "l2"})
    model = _build(task, tiny_checkpoint, ds_kind="clusters", ds_key="att", ds_clusters=str(tmp_path / "c"),
                   ds_train_centroids=True)
    lp = model(**sample["net_input"])[0]
    torch.testing.assert_close(lp.exp().sum(-1), torch.ones(lp.shape[:-1]), rtol=1e-4, atol=1e-4)
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["head.centroids"]
    with pytest.raises(KnnlmError, match="--ds-key ffn"):
        _build(task, tiny_checkpoint, ds_kind="clusters", ds_key="ffn", ds_clusters=str(tmp_path / "c"))
    with pytest.raises(KnnlmError, match="--base-checkpoint"):
        _build(task, tmp_path / "missing.pt")
