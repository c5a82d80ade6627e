"""Captured `att`/`ffn` keys equal the values recomputed by hand from the last layer's modules."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from fairseq import checkpoint_utils

import knnlm  # noqa: F401
from knnlm.models import KeyCapture
from knnlm.models.capture import key_dim

from .conftest import run_module


@pytest.fixture(autouse=True, scope="module")
def float64_models():
    """Recompute in float64 here, and leave the global default as it was for other modules."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


def recompute_keys(decoder, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """att and ffn (B x T x C) of the last layer, from its modules, step by step."""
    _, extra = decoder.extract_features(tokens, encoder_out=None)
    x = extra["inner_states"][-2]  # T x B x C: input of the last layer
    layer = decoder.layers[-1]
    mask = decoder.buffered_future_mask(x)
    if layer.normalize_before:
        h = layer.self_attn_layer_norm(x)
        h, _ = layer.self_attn(query=h, key=h, value=h, attn_mask=mask, need_weights=False)
        x = x + h
        att = layer.final_layer_norm(x)
        out = x + layer.fc2(layer.activation_fn(layer.fc1(att)))
    else:
        h, _ = layer.self_attn(query=x, key=x, value=x, attn_mask=mask, need_weights=False)
        att = layer.self_attn_layer_norm(x + h)
        out = layer.final_layer_norm(att + layer.fc2(layer.activation_fn(layer.fc1(att))))
    if decoder.layer_norm is not None:
        out = decoder.layer_norm(out)
    out = out.transpose(0, 1)
    if decoder.project_out_dim is not None:
        out = decoder.project_out_dim(out)
    return att.transpose(0, 1), out


def assert_capture_matches(model, tokens):
    model.eval()
    with torch.no_grad(), KeyCapture(model.decoder) as capture:
        model(tokens)
        att, ffn = capture.pop("att"), capture.pop("ffn")
        want_att, want_ffn = recompute_keys(model.decoder, tokens)
    torch.testing.assert_close(att, want_att, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ffn, want_ffn, rtol=1e-10, atol=1e-10)
    assert att.shape[-1] == key_dim(model.decoder, "att")
    assert ffn.shape[-1] == key_dim(model.decoder, "ffn")


def train_and_load(data_bin: Path, save_dir: Path, arch_args: list[str]):
    run_module(
        "fairseq_cli.train",
        [
            str(data_bin), "--user-dir", str(Path(knnlm.__file__).parent),
            "--task", "language_modeling", *arch_args,
            "--tokens-per-sample", "32", "--max-tokens", "256", "--optimizer", "adam", "--lr", "0.001",
            "--max-update", "2", "--save-dir", str(save_dir), "--no-epoch-checkpoints",
            "--no-progress-bar", "--seed", "1", "--cpu", "--num-workers", "0", "--ddp-backend", "legacy_ddp",
        ],
    )
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(save_dir / "checkpoint_last.pt")], arg_overrides={"data": str(data_bin)}
    )
    return models[0].double(), cfg, task


SMALL = ["--decoder-layers", "2", "--decoder-embed-dim", "32", "--decoder-ffn-embed-dim", "64",
         "--decoder-attention-heads", "4"]
VARIANTS = {
    # stock fairseq: `transformer_lm` is post-norm with input/output dims left at 512 (projections);
    # `transformer_lm_wiki103` style is pre-norm, adaptive softmax, no final norm.
    "stock_post_norm_projections": ["--arch", "transformer_lm", *SMALL],
    "stock_pre_norm_adaptive": ["--arch", "transformer_lm_gpt2_tiny", *SMALL, "--decoder-input-dim", "32",
                                "--decoder-output-dim", "32", "--criterion", "adaptive_loss",
                                "--adaptive-softmax-cutoff", "50,200", "--no-decoder-final-norm"],
    "knnlm_pre_norm": ["--arch", "knnlm_transformer_lm_tiny"],
    "knnlm_post_norm": ["--arch", "knnlm_transformer_lm_tiny", "--decoder-post-norm"],
    "knnlm_output_projection": ["--arch", "knnlm_transformer_lm_tiny", "--decoder-input-dim", "48",
                                "--decoder-output-dim", "48",
                                "--no-decoder-final-norm"],
}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_capture_equals_recomputation_on_checkpoints(variant, tiny_data_bin, tmp_path):
    model, cfg, task = train_and_load(tiny_data_bin, tmp_path, VARIANTS[variant])
    post_norm = variant.endswith("post_norm") or variant.startswith("stock_post_norm")
    assert model.decoder.layers[-1].normalize_before is (not post_norm)
    if variant == "stock_post_norm_projections":
        assert model.decoder.project_out_dim is not None  # the stock 512-d default at work
    tokens = torch.randint(4, len(task.dictionary), (3, 17))
    assert_capture_matches(model, tokens)


def test_knnlm_arch_returns_keys_in_extra(tiny_checkpoint, tiny_data_bin):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
    )
    model = models[0].double().eval()
    tokens = torch.randint(4, len(task.dictionary), (2, 9))
    with torch.no_grad():
        _, extra = model(tokens)
        want_att, want_ffn = recompute_keys(model.decoder, tokens)
    torch.testing.assert_close(extra["att"], want_att)
    torch.testing.assert_close(extra["ffn"], want_ffn)


def test_keys_keep_the_graph(tiny_checkpoint, tiny_data_bin):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
    )
    model = models[0].train()
    _, extra = model(torch.randint(4, len(task.dictionary), (2, 5)))
    extra["att"].pow(2).sum().backward()
    fc1_grad = model.decoder.layers[-1].fc1.weight.grad
    assert fc1_grad is None  # att is fc1's input: upstream of fc1 only
    assert model.decoder.layers[-1].final_layer_norm.weight.grad.abs().sum() > 0


def test_deepcopy_gets_an_independent_capture(tiny_checkpoint, tiny_data_bin):
    models, _, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
    )
    model = models[0].eval()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in twin.parameters():
            p.add_(0.5)
        tokens = torch.randint(4, len(task.dictionary), (1, 6))
        _, extra = model(tokens)
        _, twin_extra = twin(tokens)
    assert twin.key_capture is not model.key_capture
    assert not torch.allclose(extra["att"], twin_extra["att"])
    torch.testing.assert_close(model(tokens)[1]["att"], extra["att"])


def test_capture_refuses_a_non_transformer():
    with pytest.raises(TypeError, match="TransformerDecoder"):
        KeyCapture(torch.nn.Linear(2, 2))
    capture = KeyCapture.__new__(KeyCapture)
    capture._store = {}
    with pytest.raises(RuntimeError, match="run a forward first"):
        capture.pop("att")
    with pytest.raises(ValueError, match="unknown key type"):
        capture.pop("query")
