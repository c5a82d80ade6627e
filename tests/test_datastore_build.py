"""`datastore build`: keys are fairseq eval_lm's hidden states, resumable, shardable, refusing mismatches."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fairseq import checkpoint_utils
from fairseq.data import data_utils

import knnlm  # noqa: F401  (registers the fairseq components)
from knnlm.cli import datastore as datastore_cli
from knnlm.datastore import Datastore, DatastoreBuildConfig, build_datastore, dictionary_fingerprint
from knnlm.datastore.shards import merge_datastores
from knnlm.errors import KnnlmError
from knnlm.models.capture import capture_keys

T, C = 64, 32  # tokens_per_sample, context_window (the tiny checkpoint has 64 positions)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def config(ckpt: Path, data: Path, out: Path, **kw) -> DatastoreBuildConfig:
    base = dict(
        checkpoint=str(ckpt),
        data=str(data),
        out=str(out),
        tokens_per_sample=T,
        context_window=C,
        max_tokens=256,
        chunk_tokens=2048,
        device="cpu",
    )
    base.update(kw)
    return DatastoreBuildConfig(**base)


@pytest.fixture(scope="module")
def lm(tiny_checkpoint, tiny_data_bin):
    models, _cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(tiny_checkpoint)], arg_overrides={"data": str(tiny_data_bin)}
    )
    return models[0].eval(), task


@pytest.fixture(scope="module")
def stream(lm, tiny_data_bin) -> np.ndarray:
    """The train split's tokens, concatenated by hand."""
    lines = data_utils.load_indexed_dataset(str(tiny_data_bin / "train"), lm[1].source_dictionary)
    return np.concatenate([np.asarray(lines[i]) for i in range(len(lines))]).astype(np.int64)


@pytest.fixture(scope="module")
def full(tiny_checkpoint, tiny_data_bin, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ds") / "full"
    build_datastore(config(tiny_checkpoint, tiny_data_bin, out))
    return out


def file_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.suffix == ".npy"}


def eval_lm_reference(lm, tokens_per_sample: int, context_window: int):
    """Keys and targets as fairseq's own eval_lm pipeline forms them (LMContextWindowDataset)."""
    model, task = lm
    task.args.tokens_per_sample = tokens_per_sample - context_window  # what eval_lm.main does
    task.load_dataset("train")
    itr = task.eval_lm_dataloader(task.dataset("train"), max_tokens=2048, num_workers=0, context_window=context_window)
    pad = task.source_dictionary.pad()
    keys: dict[str, dict[int, np.ndarray]] = {"att": {}, "ffn": {}}
    targets: dict[int, np.ndarray] = {}
    for sample in itr:
        captured = capture_keys(model, sample["net_input"]["src_tokens"])
        for row, sample_id in enumerate(sample["id"].tolist()):
            mask = sample["target"][row] != pad
            targets[sample_id] = sample["target"][row][mask].numpy()
            for kt in keys:
                keys[kt][sample_id] = captured[kt][row][mask].numpy()
    order = sorted(targets)  # blocks in stream order (eval_lm without a context window sorts by size)
    return {kt: np.concatenate([v[i] for i in order]) for kt, v in keys.items()}, np.concatenate(
        [targets[i] for i in order]
    )


def assert_keys_close(stored: np.ndarray, reference: np.ndarray) -> None:
    assert stored.dtype == np.float16
    np.testing.assert_allclose(stored.astype(np.float32), reference, rtol=3e-3, atol=3e-3)


def test_keys_and_values_match_fairseq_eval_lm(full, lm, stream):
    ref_keys, ref_targets = eval_lm_reference(lm, T, C)
    for kt in ("att", "ffn"):
        store = Datastore.open(full / kt)
        assert store.num_keys == len(stream) == len(ref_targets)  # one key per target token of the split
        np.testing.assert_array_equal(store.vals, ref_targets)
        np.testing.assert_array_equal(store.vals, stream)
        assert_keys_close(store.keys, ref_keys[kt])


def test_no_context_window_matches_plain_eval_lm(lm, tiny_checkpoint, tiny_data_bin, tmp_path):
    build_datastore(
        config(tiny_checkpoint, tiny_data_bin, tmp_path, tokens_per_sample=32, context_window=0, key_types=["ffn"])
    )
    ref_keys, ref_targets = eval_lm_reference(lm, 32, 0)
    store = Datastore.open(tmp_path / "ffn")
    np.testing.assert_array_equal(store.vals, ref_targets)
    assert_keys_close(store.keys, ref_keys["ffn"])


@pytest.mark.parametrize("p", [0, 1, 31, 32, 33, 95, 5000, -1])
def test_key_equals_hand_run_on_its_context(full, lm, stream, p):
    """Target p of block [s, s+L) sees </s>+stream, from max(0, s-C) up to p (first token: </s> only)."""
    model, task = lm
    p = p % len(stream)
    source = np.concatenate([[task.source_dictionary.eos()], stream[:-1]])
    s = p // (T - C) * (T - C)
    context = torch.from_numpy(source[max(0, s - C) : p + 1])[None]
    captured = capture_keys(model, context)
    for kt in ("att", "ffn"):
        store = Datastore.open(full / kt)
        assert store.vals[p] == stream[p]
        assert_keys_close(store.keys[p][None], captured[kt][0, -1:].numpy())


def test_meta_records_what_made_the_keys(full, tiny_data_bin, lm):
    store = Datastore.open(full / "att")
    meta = store.meta
    assert (meta["key_type"], meta["key_dim"], meta["key_dtype"], meta["val_dtype"]) == ("att", 64, "float16", "int32")
    assert meta["context"]["tokens_per_sample"] == T and meta["context"]["context_window"] == C
    assert meta["source"]["dictionary_sha256"] == dictionary_fingerprint(lm[1].source_dictionary)
    assert meta["source"]["split_tokens"] == meta["num_keys"]
    assert meta["code_version"] == knnlm.__version__
    assert not (full / "att" / "progress.json").exists()
    assert np.load(full / "att" / "keys.npy", mmap_mode="r").shape == (meta["num_keys"], 64)
    assert Datastore.open(full / "ffn").datastore_id != store.datastore_id


class Interrupt(Exception):
    pass


def test_interrupted_build_resumes_byte_identical(full, tiny_checkpoint, tiny_data_bin, tmp_path):
    cfg = config(tiny_checkpoint, tiny_data_bin, tmp_path)
    seen = []

    def stop_after_two(next_batch: int, rows: int) -> None:
        seen.append(next_batch)
        if len(seen) == 2:
            raise Interrupt

    with pytest.raises(Interrupt):
        build_datastore(cfg, on_chunk=stop_after_two)
    for kt in ("att", "ffn"):
        assert (tmp_path / kt / "progress.json").exists() and not (tmp_path / kt / "meta.json").exists()
        with pytest.raises(KnnlmError, match="half-written"):
            Datastore.open(tmp_path / kt)
    resumed = []
    build_datastore(cfg, on_chunk=lambda b, r: resumed.append(b))
    assert resumed[0] > seen[-1]  # continued after the last committed chunk, not from 0
    for kt in ("att", "ffn"):
        assert file_bytes(tmp_path / kt) == file_bytes(full / kt)
        assert Datastore.open(tmp_path / kt).datastore_id == Datastore.open(full / kt).datastore_id


def test_build_stopped_before_its_first_chunk_starts_over(full, tiny_checkpoint, tiny_data_bin, tmp_path, monkeypatch):
    """Stopped while the first batch runs: the preallocated files are claimed, not of unknown origin."""
    from knnlm.datastore import build as build_module

    def stopped(*args, **kwargs):
        raise Interrupt

    cfg = config(tiny_checkpoint, tiny_data_bin, tmp_path)
    with monkeypatch.context() as patch:
        patch.setattr(build_module, "_batch", stopped)
        with pytest.raises(Interrupt):
            build_datastore(cfg)
    for kt in ("att", "ffn"):
        assert (tmp_path / kt / "keys.npy").exists()
        assert json.loads((tmp_path / kt / "progress.json").read_text())["next_unit"] is None
    build_datastore(cfg)
    for kt in ("att", "ffn"):
        assert file_bytes(tmp_path / kt) == file_bytes(full / kt)
        assert not (tmp_path / kt / "progress.json").exists()


def test_subsample_keeps_a_seeded_subset_of_the_same_keys(full, tiny_checkpoint, tiny_data_bin, tmp_path):
    build_datastore(config(tiny_checkpoint, tiny_data_bin, tmp_path, subsample=0.3, seed=5, key_types=["ffn"]))
    whole, part = Datastore.open(full / "ffn"), Datastore.open(tmp_path / "ffn")
    pos = part.positions()
    assert part.num_keys == round(0.3 * whole.num_keys)
    assert np.all(np.diff(pos) > 0) and pos[0] >= 0 and pos[-1] < whole.num_keys
    np.testing.assert_array_equal(part.keys, whole.keys[pos])
    np.testing.assert_array_equal(part.vals, whole.vals[pos])
    assert part.meta["subsample"] == {"ratio": 0.3, "seed": 5, "kept": part.num_keys}


def test_shards_merge_into_the_one_shot_build(full, tiny_checkpoint, tiny_data_bin, tmp_path):
    shards = []
    for i in range(3):
        out = tmp_path / f"shard{i}"
        build_datastore(config(tiny_checkpoint, tiny_data_bin, out, num_shards=3, shard_id=i, key_types=["att"]))
        shards.append(out / "att")
    firsts = [Datastore.open(s).positions()[0] for s in shards]
    assert firsts[0] == 0 and firsts == sorted(firsts)
    merged = merge_datastores(list(reversed(shards)), tmp_path / "merged")
    assert file_bytes(merged) == file_bytes(full / "att")
    assert Datastore.open(merged).datastore_id == Datastore.open(full / "att").datastore_id
    with pytest.raises(KnnlmError, match="shards 0..2"):
        merge_datastores(shards[:2], tmp_path / "partial")


def test_complete_datastore_with_other_settings_is_not_overwritten(full, tiny_checkpoint, tiny_data_bin):
    before = {kt: file_bytes(full / kt) | {"meta": (full / kt / "meta.json").read_bytes()} for kt in ("att", "ffn")}
    with pytest.raises(KnnlmError, match="already holds a complete datastore.*--overwrite"):
        build_datastore(config(tiny_checkpoint, tiny_data_bin, full, context_window=16))
    after = {kt: file_bytes(full / kt) | {"meta": (full / kt / "meta.json").read_bytes()} for kt in ("att", "ffn")}
    assert after == before


def test_half_written_build_with_other_settings_is_refused(tiny_checkpoint, tiny_data_bin, tmp_path):
    def stop(next_batch: int, rows: int) -> None:
        raise Interrupt

    with pytest.raises(Interrupt):
        build_datastore(config(tiny_checkpoint, tiny_data_bin, tmp_path, key_types=["ffn"]), on_chunk=stop)
    before = file_bytes(tmp_path / "ffn") | {"p": (tmp_path / "ffn" / "progress.json").read_bytes()}
    with pytest.raises(KnnlmError, match="half-written build with other settings"):
        build_datastore(config(tiny_checkpoint, tiny_data_bin, tmp_path, key_types=["ffn"], seed=2, subsample=0.5))
    assert file_bytes(tmp_path / "ffn") | {"p": (tmp_path / "ffn" / "progress.json").read_bytes()} == before


def test_open_refuses_other_dictionary_dimension_key_type(full):
    path = full / "ffn"
    store = Datastore.open(path)
    other_dict = dictionary_fingerprint(["<s>", "<pad>", "</s>", "<unk>", "the"])
    with pytest.raises(KnnlmError, match="another dictionary"):
        Datastore.open(path, dictionary_sha256=other_dict)
    with pytest.raises(KnnlmError, match="dimension 64 but the model's ffn key has dimension 1024"):
        Datastore.open(path, key_dim=1024)
    with pytest.raises(KnnlmError, match="'att' keys were asked for"):
        Datastore.open(path, key_type="att")
    with pytest.raises(KnnlmError, match="another checkpoint"):
        store.check_compatible(checkpoint_sha256="0" * 64)
    Datastore.open(path, key_type="ffn", key_dim=64, dictionary_sha256=store.meta["source"]["dictionary_sha256"])


def test_open_refuses_files_that_disagree_with_meta(full, tmp_path):
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in (full / "ffn").iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    np.save(copy / "vals.npy", np.zeros(10, dtype=np.int32))
    with pytest.raises(KnnlmError, match="vals.npy holds int32\\[10\\].*rebuild"):
        Datastore.open(copy)
    meta = json.loads((copy / "meta.json").read_text())
    meta["key_dim"] = 32
    (copy / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(KnnlmError, match="edited after the build"):
        Datastore.open(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(KnnlmError, match="meta.json is missing"):
        Datastore.open(copy)


def test_too_long_windows_are_refused(tiny_checkpoint, tiny_data_bin, tmp_path):
    with pytest.raises(KnnlmError, match="exceeds the 64 positions"):
        build_datastore(config(tiny_checkpoint, tiny_data_bin, tmp_path, tokens_per_sample=128))
    assert not (tmp_path / "att").exists()


def test_cli_build_and_info(full, tiny_checkpoint, tiny_data_bin, capsys):
    parser = argparse.ArgumentParser()
    datastore_cli.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(
        [
            "datastore",
            "build",
            "--checkpoint",
            str(tiny_checkpoint),
            "--data",
            str(tiny_data_bin),
            "--out",
            str(full),
            "--tokens-per-sample",
            str(T),
            "--context-window",
            str(C),
            "--max-tokens",
            "256",
            "--chunk-tokens",
            "2048",
            "--device",
            "cpu",
            "--key-types",
            "att,ffn",
        ]
    )
    args.func(args)  # already complete: verified, nothing rebuilt
    assert f"{full / 'att'}: " in capsys.readouterr().out
    args = parser.parse_args(["datastore", "info", str(full / "ffn")])
    args.func(args)
    assert json.loads(capsys.readouterr().out)["key_type"] == "ffn"


def test_hydra_config_matches_the_schema():
    from hydra import compose, initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    ConfigStore.instance().store(name="datastore_build", node=DatastoreBuildConfig)
    conf_dir = Path(__file__).resolve().parents[1] / "configs" / "datastore"
    with initialize_config_dir(config_dir=str(conf_dir), version_base=None):
        cfg = compose("wikitext103", overrides=["checkpoint=c.pt", "data=d", "out=o"])
    built = OmegaConf.to_object(cfg)
    assert isinstance(built, DatastoreBuildConfig)
    assert (built.tokens_per_sample, built.context_window) == (3072, 1536)
    assert dataclasses.asdict(built)["key_types"] == ["att", "ffn"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (fp16 forward path)")
def test_gpu_fp16_build_matches_cpu_keys(full, tiny_checkpoint, tiny_data_bin, tmp_path):
    build_datastore(config(tiny_checkpoint, tiny_data_bin, tmp_path, device="cuda", key_types=["ffn"]))
    gpu, cpu = Datastore.open(tmp_path / "ffn"), Datastore.open(full / "ffn")
    assert gpu.meta["compute"]["dtype"] == "float16"
    np.testing.assert_array_equal(gpu.vals, cpu.vals)
    np.testing.assert_allclose(gpu.keys.astype(np.float32), cpu.keys.astype(np.float32), rtol=3e-2, atol=3e-2)


def test_sharded_build_through_the_joblib_launcher_equals_the_one_shot_build(full, tiny_checkpoint, tiny_data_bin,
                                                                              tmp_path):
    """A hydra multirun over shard_id, two local joblib workers, then merge: the one-shot build's bytes."""
    pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
    import os
    import subprocess
    import sys

    shards = tmp_path / "shards"
    proc = subprocess.run(
        [sys.executable, "-m", "knnlm.cli.datastore", "--multirun", "hydra/launcher=joblib",
         "hydra.launcher.n_jobs=2", f"hydra.sweep.dir={tmp_path / 'multirun'}", f"checkpoint={tiny_checkpoint}",
         f"data={tiny_data_bin}", "out=" + str(shards) + "/s${shard_id}", "num_shards=2", "shard_id=0,1",
         f"tokens_per_sample={T}", f"context_window={C}", "max_tokens=256", "chunk_tokens=2048", "device=cpu",
         "key_types=[att]"],
        capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged = merge_datastores([shards / "s0" / "att", shards / "s1" / "att"], tmp_path / "merged")
    assert file_bytes(merged) == file_bytes(full / "att")
    assert Datastore.open(merged).datastore_id == Datastore.open(full / "att").datastore_id


def test_a_linked_complete_datastore_is_kept_and_the_other_key_type_built(full, tiny_checkpoint, tiny_data_bin,
                                                                          tmp_path):
    """scripts/xu2023.sh links the att datastore of scripts/ton2022.sh and builds att,ffn: att is confirmed
    (not rewritten through the link), ffn is built, the same bytes as a build of both at once."""
    out = tmp_path / "xu"
    out.mkdir()
    (out / "att").symlink_to(full / "att")
    att = file_bytes(full / "att")
    att_meta = (full / "att" / "meta.json").read_text()
    build_datastore(config(tiny_checkpoint, tiny_data_bin, out, key_types=["att", "ffn"]))
    assert (out / "att").is_symlink() and file_bytes(full / "att") == att
    assert (full / "att" / "meta.json").read_text() == att_meta
    assert file_bytes(out / "ffn") == file_bytes(full / "ffn")
