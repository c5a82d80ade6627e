"""A checkpoint is loaded only with the dictionary it was trained with; a non-checkpoint is one clear error."""

from __future__ import annotations

import shutil

import pytest

from knnlm.errors import KnnlmError
from knnlm.models.fairseq_lm import load_language_model


def copy_data_bin(src, dst, edit):
    shutil.copytree(src, dst)
    lines = (dst / "dict.txt").read_text(encoding="utf-8").splitlines()
    (dst / "dict.txt").write_text("\n".join(edit(lines)) + "\n", encoding="utf-8")
    return dst


def test_the_training_dictionary_loads(tiny_checkpoint, tiny_data_bin):
    model, task = load_language_model(tiny_checkpoint, tiny_data_bin)
    assert len(task.source_dictionary) == model.decoder.embed_tokens.num_embeddings


def test_a_dictionary_of_the_same_size_with_other_symbols_is_refused(tiny_checkpoint, tiny_data_bin, tmp_path):
    swapped = copy_data_bin(tiny_data_bin, tmp_path / "swapped", lambda lines: [lines[1], lines[0], *lines[2:]])
    with pytest.raises(KnnlmError, match="not the dictionary .* was trained with"):
        load_language_model(tiny_checkpoint, swapped)


def test_a_dictionary_of_another_size_is_one_clear_error(tiny_checkpoint, tiny_data_bin, tmp_path):
    import torch

    shorter = copy_data_bin(tiny_data_bin, tmp_path / "short", lambda lines: lines[:-5])
    with pytest.raises(KnnlmError, match="not the dictionary"):
        load_language_model(tiny_checkpoint, shorter)
    # a checkpoint whose training data-bin is gone: only the sizes can be compared
    state = torch.load(tiny_checkpoint, map_location="cpu", weights_only=False)
    state["cfg"]["task"]["data"] = str(tmp_path / "gone")
    moved = tmp_path / "moved.pt"
    torch.save(state, moved)
    with pytest.raises(KnnlmError, match="another vocabulary size"):
        load_language_model(moved, shorter)


def test_a_file_that_is_not_a_checkpoint_is_refused(tiny_data_bin, tmp_path):
    bogus = tmp_path / "model.pt"
    bogus.write_text("this is not a checkpoint")
    with pytest.raises(KnnlmError, match="not a readable fairseq checkpoint"):
        load_language_model(bogus, tiny_data_bin)
