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


def test_checkpoints_load_after_a_hydra_app_set_a_new_version_base(tiny_checkpoint, tiny_data_bin):
    """Our hydra apps set version_base; fairseq's conversion of old (args-style) checkpoints must still work."""
    from argparse import Namespace

    from fairseq.dataclass.utils import convert_namespace_to_omegaconf
    from hydra.version import setbase

    from knnlm.datastore.build import load_language_model
    from knnlm.models.loading import fairseq_hydra_compat

    setbase("1.3")  # what @hydra.main(version_base="1.3") does (the conftest fixture restores it)
    with fairseq_hydra_compat():
        cfg = convert_namespace_to_omegaconf(Namespace(task="language_modeling", arch="knnlm_transformer_lm_tiny",
                                                       data=str(tiny_data_bin), _name=None))
    assert cfg.task._name == "language_modeling"
    model, _ = load_language_model(tiny_checkpoint, tiny_data_bin)
    assert isinstance(model, KnnTransformerLanguageModel)
