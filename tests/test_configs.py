"""Hydra training configs match the argparse arch presets, and fairseq-hydra-train runs them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from fairseq import options
from omegaconf import OmegaConf

import knnlm  # noqa: F401

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "train"
PRESET_OF_CONFIG = {"tiny.yaml": "knnlm_transformer_lm_tiny"}


def preset_args(arch: str, data: str):
    parser = options.get_training_parser()
    return options.parse_args_and_arch(parser, [data, "--task", "language_modeling", "--arch", arch])


@pytest.mark.parametrize("config_name", sorted(PRESET_OF_CONFIG))
def test_hydra_model_section_spells_out_the_preset(config_name, tmp_path):
    model = OmegaConf.load(CONFIGS / config_name).model
    assert model._name == "knnlm_transformer_lm"
    args = preset_args(PRESET_OF_CONFIG[config_name], str(tmp_path))
    for key, value in model.items():
        if key != "_name":
            assert getattr(args, key) == value, f"{config_name}: model.{key}"
    for key in ("decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads"):
        assert key in model, f"{config_name} must spell out model.{key}"


def test_fairseq_hydra_train_runs_the_tiny_config(tiny_data_bin, tmp_path):
    save_dir = tmp_path / "ckpt"
    cmd = [
        sys.executable, "-c", "from fairseq_cli.hydra_train import cli_main; cli_main()",
        "--config-dir", str(CONFIGS), "--config-name", "tiny",
        f"task.data={tiny_data_bin}", f"common.user_dir={Path(knnlm.__file__).parent}",
        f"checkpoint.save_dir={save_dir}", "optimization.max_update=2", "task.tokens_per_sample=32",
        "dataset.disable_validation=true", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (save_dir / "checkpoint_last.pt").exists()
    assert "num. shared model params: " in proc.stdout + proc.stderr


def test_fairseq_hydra_train_runs_the_ds_replacement_config(tiny_data_bin, tiny_checkpoint, tmp_path):
    save_dir = tmp_path / "head"
    cmd = [
        sys.executable, "-c", "from fairseq_cli.hydra_train import cli_main; cli_main()",
        "--config-dir", str(CONFIGS), "--config-name", "ds_replacement_wikitext2_small",
        f"task.data={tiny_data_bin}", f"common.user_dir={Path(knnlm.__file__).parent}",
        f"model.base_checkpoint={tiny_checkpoint}", "model.ds_n=2", "task.tokens_per_sample=32",
        f"checkpoint.save_dir={save_dir}", "optimization.max_update=2", f"hydra.run.dir={tmp_path / 'hydra'}",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import torch

    state = torch.load(save_dir / "checkpoint_last.pt", weights_only=False)
    assert state["cfg"]["model"]["ds_n"] == 2 and "head.weight" in state["model"]
    assert not any(k.startswith("base.") for k in state["model"])
