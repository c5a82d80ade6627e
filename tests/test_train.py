"""`fairseq-train --user-dir knnlm` trains, saves, and the checkpoint loads back."""

from __future__ import annotations

import torch
from fairseq import checkpoint_utils

import knnlm  # noqa: F401
from knnlm.models import KnnTransformerLanguageModel


def test_fairseq_train_then_load(tiny_checkpoint, tiny_data_bin):
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
    )
    model = models[0].eval()
    assert isinstance(model, KnnTransformerLanguageModel)
    assert cfg.model.decoder_embed_dim == 64 and cfg.model.decoder_layers == 2
    assert cfg.model.decoder_input_dim == 64 and cfg.model.decoder_output_dim == 64
    assert model.decoder.project_in_dim is None and model.decoder.project_out_dim is None
    tokens = torch.randint(4, len(task.dictionary), (2, 10))
    with torch.no_grad():
        logits, extra = model(tokens)
    assert logits.shape == (2, 10, len(task.dictionary))
    assert extra["att"].shape == (2, 10, 64) and extra["ffn"].shape == (2, 10, 64)
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["num_updates"] == 6
