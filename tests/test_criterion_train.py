"""The criteria inside fairseq: fairseq-train (exact MoCo resume, stock arch + adaptive softmax)
and the hydra configs under configs/train (composition and one fairseq-hydra-train run).

fairseq-train runs in this process (``fairseq_cli.train.main``, the CLI's own code path)
except where a second process is the point (the resumed half of the resume test, the
hydra run): importing fairseq costs seconds per subprocess on a shared machine.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fairseq import distributed_utils, options
from fairseq.data import Dictionary
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq_cli.train import main as fairseq_train_main
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

import knnlm  # noqa: F401
from knnlm.models.transformer_lm import (
    KnnTransformerLanguageModel,
    knnlm_transformer_lm_small,
    knnlm_transformer_lm_tiny,
)

from .test_criterion_support import LmTask

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "train"
USER_DIR = str(ROOT / "knnlm")

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]


def run(module: str, args: list[str], cwd: Path | None = None) -> str:
    """``python -m module args`` on one thread (tiny models crawl on more when cores are shared)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return proc.stdout + proc.stderr


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} | {record.getMessage()}")


def fairseq_train(data_bin: Path, save_dir: Path, extra: list[str], subprocess_run: bool = False) -> str:
    """fairseq-train on the tiny corpus; returns its log."""
    args = train_args(data_bin, save_dir, extra)
    if subprocess_run:
        return run("fairseq_cli.train", args)
    handler, root = _Lines(), logging.getLogger()
    level, dtype = root.level, torch.get_default_dtype()
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    torch.set_default_dtype(torch.float32)  # as in a fresh process (other test modules change it)
    try:
        cfg = convert_namespace_to_omegaconf(options.parse_args_and_arch(options.get_training_parser(), args))
        distributed_utils.call_main(cfg, fairseq_train_main)
    finally:
        root.removeHandler(handler)
        root.setLevel(level)
        torch.set_default_dtype(dtype)
    return "\n".join(handler.lines)


def train_args(data_bin: Path, save_dir: Path, extra: list[str]) -> list[str]:
    return [
        str(data_bin),
        "--user-dir", USER_DIR,
        "--task", "language_modeling",
        "--tokens-per-sample", "64",
        "--max-tokens", "512",
        "--optimizer", "adam", "--lr", "0.001",
        "--save-dir", str(save_dir),
        "--no-epoch-checkpoints", "--no-progress-bar",
        "--log-format", "simple", "--log-interval", "1",
        "--seed", "1", "--cpu", "--num-workers", "0",
        *extra,
    ]  # fmt: skip


def train_inner_logs(log: str) -> dict[int, str]:
    """num_updates -> the metrics of its train_inner line (log interval 1), minus timings."""
    lines = {}
    for line in log.splitlines():
        if "train_inner" in line and "num_updates=" in line:
            step = int(re.search(r"num_updates=(\d+)", line).group(1))
            lines[step] = re.sub(r", (wps|ups|train_wall|wall)=[^,]*", "", line.split("train_inner", 1)[1])
    return lines


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for key, value in a.items():
        if torch.is_tensor(value):
            assert torch.equal(value, b[key]), f"{what}: {key}"
        elif isinstance(value, dict):
            assert_same_tensors(value, b[key], f"{what}.{key}")
        else:
            assert value == b[key], f"{what}: {key}"


def test_moco_queue_resume_continues_exactly(tiny_data_bin, tmp_path):
    """6 updates straight == 3 updates, stop, resume from checkpoint_last.pt, 3 more."""
    moco = [
        "--arch", "knnlm_transformer_lm_tiny", "--dropout", "0",
        "--criterion", "moco_queue", "--activation-weight", "0.01", "--queue-size", "2",
        "--moco-momentum", "0.9",
    ]  # fmt: skip
    straight_log = fairseq_train(tiny_data_bin, tmp_path / "straight", [*moco, "--max-update", "6"])
    fairseq_train(tiny_data_bin, tmp_path / "split", [*moco, "--max-update", "3"])
    # a new process: nothing but the checkpoint carries the state over
    resumed_log = fairseq_train(tiny_data_bin, tmp_path / "split", [*moco, "--max-update", "6"], subprocess_run=True)

    straight, resumed = train_inner_logs(straight_log), train_inner_logs(resumed_log)
    assert sorted(resumed) == [4, 5, 6] and "queue_fill" in resumed[6]
    assert all(resumed[step] == straight[step] for step in (4, 5, 6))

    a = torch.load(tmp_path / "straight" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    b = torch.load(tmp_path / "split" / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert a["optimizer_history"][-1]["num_updates"] == b["optimizer_history"][-1]["num_updates"] == 6
    assert a["optimizer_history"][-1]["criterion_name"] == "MocoQueueCriterion"
    assert any(k.startswith("momentum_encoder.") for k in a["criterion"])
    assert a["criterion"]["queues.count"].sum() > 0
    assert not any("listener" in k for k in a["model"])  # the model's checkpoint keys are unchanged
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["criterion"], b["criterion"], "criterion")
    assert_same_tensors(a["last_optimizer_state"], b["last_optimizer_state"], "optimizer")


def test_activation_l2_trains_stock_transformer_lm_with_adaptive_softmax(tiny_data_bin, tmp_path):
    """No --ddp-backend legacy_ddp needed on one process; the ffn key behind a projection."""
    log = fairseq_train(
        tiny_data_bin,
        tmp_path,
        [
            "--arch", "transformer_lm", "--decoder-layers", "1", "--decoder-embed-dim", "32",
            "--decoder-ffn-embed-dim", "64", "--decoder-attention-heads", "2",
            "--decoder-output-dim", "48", "--adaptive-softmax-cutoff", "500,1500", "--dropout", "0",
            "--criterion", "activation_l2", "--activation-weight", "0.1", "--knn-key", "ffn",
            "--max-update", "3",
        ],
    )  # fmt: skip
    inner = train_inner_logs(log)
    assert sorted(inner) == [1, 2, 3]
    assert all(f" {name}=" in inner[3] for name in ("loss", "ppl", "penalty", "key_sq_norm"))
    state = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    assert state["optimizer_history"][-1]["criterion_name"] == "ActivationL2Criterion"
    assert state["criterion"] is None  # nothing to save for Eq. 2
    assert "decoder.project_out_dim.weight" in state["model"]
    assert "decoder.adaptive_softmax.head.weight" in state["model"]


# -- hydra configs --------------------------------------------------------------------------------


def compose_train_config(name: str, overrides: list[str] = ()):
    """Compose ``configs/train/<name>.yaml`` as fairseq-hydra-train does (schema, then defaults)."""
    hydra_init(name)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIGS), version_base=None):
        cfg = compose(config_name=name, overrides=list(overrides), return_hydra_config=True)
    hydra_cfg = cfg.hydra
    with_defaults = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
    add_defaults(with_defaults)
    return with_defaults, hydra_cfg


def preset(arch_fn) -> argparse.Namespace:
    args = argparse.Namespace()
    arch_fn(args)
    return args


PRESET_FIELDS = (
    "decoder_layers", "decoder_embed_dim", "decoder_input_dim", "decoder_output_dim",
    "decoder_ffn_embed_dim", "decoder_attention_heads", "share_decoder_input_output_embed",
    "dropout", "adaptive_softmax_cutoff",
)  # fmt: skip


@pytest.mark.parametrize(
    ("name", "arch_fn", "criterion"),
    [
        ("activation_l2_tiny", knnlm_transformer_lm_tiny, "activation_l2"),
        ("moco_queue_tiny", knnlm_transformer_lm_tiny, "moco_queue"),
        ("activation_l2_wikitext2_small", knnlm_transformer_lm_small, "activation_l2"),
        ("moco_queue_wikitext2_small", knnlm_transformer_lm_small, "moco_queue"),
        ("activation_l2_sweep_wikitext2_small", knnlm_transformer_lm_small, "activation_l2"),
    ],
)
def test_train_configs_compose_to_the_arch_preset_and_criterion(name, arch_fn, criterion):
    cfg, hydra_cfg = compose_train_config(name, ["task.data=/data", f"common.user_dir={USER_DIR}"])
    expected = preset(arch_fn)
    for field in PRESET_FIELDS:
        assert cfg.model[field] == getattr(expected, field), field
    assert cfg.criterion._name == criterion and cfg.criterion.knn_key == "att"
    assert hydra_cfg.job.chdir is False
    if "sweep" in name:
        assert hydra_cfg.mode.name == "MULTIRUN"
        params = hydra_cfg.sweeper.params
        assert sorted(map(float, params["criterion.activation_weight"].split(","))) == [0, 0.1, 1, 2, 5, 10]
        assert params["common.seed"].split(",") == ["1", "2", "3", "4", "5"]


def test_moco_queue_tiny_config_runs_with_fairseq_hydra_train(tiny_data_bin, tmp_path):
    save_dir = tmp_path / "ckpt"
    log = run(
        "fairseq_cli.hydra_train",
        [
            "--config-dir", str(CONFIGS), "--config-name", "moco_queue_tiny",
            f"task.data={tiny_data_bin}", f"common.user_dir={USER_DIR}", f"checkpoint.save_dir={save_dir}",
            "optimization.max_update=2", "dataset.disable_validation=true", "common.log_interval=1",
        ],
        cwd=tmp_path,
    )  # fmt: skip
    assert sorted(train_inner_logs(log)) == [1, 2]
    state = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu", weights_only=False)
    args = argparse.Namespace(tokens_per_sample=128, max_target_positions=None)
    knnlm_transformer_lm_tiny(args)  # what --arch knnlm_transformer_lm_tiny builds
    reference = KnnTransformerLanguageModel.build_model(args, LmTask(Dictionary.load(str(tiny_data_bin / "dict.txt"))))
    assert state["cfg"]["model"]["decoder_layers"] == 2 and state["cfg"]["model"]["decoder_embed_dim"] == 64
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in reference.state_dict().items()}
    assert state["optimizer_history"][-1]["criterion_name"] == "MocoQueueCriterion"
    assert state["criterion"]["queues.bits"].shape[1:] == (4, 64)
