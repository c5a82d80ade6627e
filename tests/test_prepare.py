"""`knnlm prepare`: counts checked against independent counts, atomic folders, clear errors, BPE, CLI."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import zipfile
from pathlib import Path

import pytest
import sentencepiece as spm
from fairseq.data import Dictionary, data_utils

import knnlm
from knnlm.cli.main import main
from knnlm.data import (
    WIKITEXT,
    RawSplit,
    Tokenization,
    prepare_corpus,
    prepare_demo,
    prepare_wikitext,
    read_data_meta,
)
from knnlm.data.sentencepiece_bpe import train_sentencepiece
from knnlm.errors import KnnlmError

SPLITS = ("train", "valid", "test")
TINY = {
    "train": " the cat sat \n \n the dog <unk> sat on the mat \n the end \n",
    "valid": " the cat ran \n \n",
    "test": " a dog <unk> \n",
}
# (lines, tokens incl. one end-of-line per line, <unk> = literal <unk> + words missing from train)
TINY_COUNTS = {"train": (4, 16), "valid": (2, 5), "test": (1, 4)}
TINY_UNK = {"train": 1, "valid": 1, "test": 2}
# the bundled demo corpus, as documented in knnlm/resources/demo_corpus/README.md
DEMO_COUNTS = {"train": (5_537, 304_243), "valid": (661, 32_151), "test": (446, 30_523)}


def write_corpus(folder: Path, texts: dict[str, str] = TINY) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, text in texts.items():
        paths[split] = folder / f"wiki.{split}.tokens"
        paths[split].write_text(text, encoding="utf-8")
    return paths


def count_words(path: Path) -> list[list[str]]:
    """The words of every line, counted here independently of knnlm (files use plain `\\n`)."""
    text = path.read_text(encoding="utf-8")
    return [line.split() for line in text.split("\n")[:-1]]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def fake_wikitext(monkeypatch, url: str = "https://example.invalid/wikitext-2-v1.zip", **changes) -> None:
    """Point the wikitext-2 release at test files (checksums, URL) for this test only."""
    spec = dataclasses.replace(WIKITEXT["wikitext-2"], url=url, **changes)
    monkeypatch.setitem(WIKITEXT, "wikitext-2", spec)


def make_zip(path: Path, texts: dict[str, str] = TINY) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for split, text in texts.items():
            zf.writestr(f"wikitext-2/wiki.{split}.tokens", text)
    return path


def assert_only(dest: Path, *names: str) -> None:
    """`dest` holds exactly `names`: no half-built or moved-aside folders were left behind."""
    assert sorted(p.name for p in dest.iterdir()) == sorted(names)


# --------------------------------------------------------------------------- word level


@pytest.fixture(scope="module")
def word_bin(text_slice, tmp_path_factory) -> Path:
    dest = tmp_path_factory.mktemp("word")
    return prepare_corpus("slice", {s: text_slice / f"wiki.{s}.tokens" for s in SPLITS}, dest)


def test_word_counts_match_independent_counts(word_bin, text_slice):
    meta = read_data_meta(word_bin)
    dictionary = Dictionary.load(str(word_bin / "dict.txt"))
    train_types = {w for line in count_words(text_slice / "wiki.train.tokens") for w in line}
    for split in SPLITS:
        lines = count_words(text_slice / f"wiki.{split}.tokens")
        tokens = sum(len(words) + 1 for words in lines)
        unk = sum(w == "<unk>" or w not in train_types for words in lines for w in words)
        assert (meta.splits[split].lines, meta.splits[split].tokens, meta.splits[split].unk) == (
            len(lines),
            tokens,
            unk,
        )
        dataset = data_utils.load_indexed_dataset(str(word_bin / split), dictionary)
        assert len(dataset) == len(lines) and int(dataset.sizes.sum()) == tokens
        first = [dictionary[i] for i in dataset[0].tolist()]
        assert first == [w if w in train_types else "<unk>" for w in lines[0]] + ["</s>"]


def test_dictionary_has_every_train_type(word_bin, text_slice):
    dictionary = Dictionary.load(str(word_bin / "dict.txt"))
    train_types = {w for line in count_words(text_slice / "wiki.train.tokens") for w in line}
    assert all(dictionary.index(w) != dictionary.unk() for w in train_types - {"<unk>"})
    expected = 4 + len(train_types - {"<unk>"})
    assert len(dictionary) == expected + (-expected % 8)  # fairseq pads to a multiple of 8
    assert read_data_meta(word_bin).dictionary.size == len(dictionary)


def test_meta_records_sources_dictionary_and_version(word_bin, text_slice):
    meta = read_data_meta(word_bin)
    raw = json.loads((word_bin / "meta.json").read_text())
    assert raw["format"] == "knnlm/data-bin" and raw["name"] == "slice"
    assert meta.knnlm_version == knnlm.__version__
    assert meta.tokenization.kind == "word" and meta.tokenization.model_file is None
    assert meta.dictionary.sha256 == sha256(word_bin / "dict.txt")
    for split in SPLITS:
        source = text_slice / f"wiki.{split}.tokens"
        assert meta.sources[split].sha256 == sha256(source)
        assert meta.sources[split].file == str(source.resolve())
        assert meta.sources[split].check == "no published checksum"
    assert_only(word_bin.parent, "slice")
    assert sorted(p.name for p in word_bin.iterdir()) == sorted(
        ["dict.txt", "meta.json", *(f"{s}.{e}" for s in SPLITS for e in ("bin", "idx"))]
    )


def test_tiny_corpus_counts_without_test_split(tmp_path):
    paths = write_corpus(tmp_path / "raw")
    out = prepare_corpus("tiny", {"train": paths["train"], "valid": paths["valid"]}, tmp_path / "bin")
    meta = read_data_meta(out)
    assert sorted(meta.splits) == ["train", "valid"]
    for split in ("train", "valid"):
        stats = meta.splits[split]
        assert (stats.lines, stats.tokens) == TINY_COUNTS[split] and stats.unk == TINY_UNK[split]


# --------------------------------------------------------------------------- atomicity


def test_existing_folder_refused_without_force_replaced_with_force(tmp_path):
    paths = write_corpus(tmp_path / "raw")
    dest = tmp_path / "bin"
    out = prepare_corpus("tiny", paths, dest)
    (out / "marker").write_text("old")
    with pytest.raises(KnnlmError, match="--force"):
        prepare_corpus("tiny", paths, dest)
    assert (out / "marker").exists()
    assert prepare_corpus("tiny", paths, dest, force=True) == out
    assert not (out / "marker").exists() and read_data_meta(out).splits["train"].tokens == 16
    assert_only(dest, "tiny")


def test_force_keeps_old_folder_when_rebuild_fails(tmp_path):
    paths = write_corpus(tmp_path / "raw")
    dest = tmp_path / "bin"
    out = prepare_corpus("tiny", paths, dest)
    (out / "marker").write_text("old")
    with pytest.raises(KnnlmError, match="no such file"):
        prepare_corpus("tiny", {**paths, "valid": tmp_path / "missing.txt"}, dest, force=True)
    assert (out / "marker").exists() and read_data_meta(out).name == "tiny"
    assert_only(dest, "tiny")


def test_folder_not_made_by_knnlm_is_refused(tmp_path):
    (tmp_path / "bin" / "tiny").mkdir(parents=True)
    (tmp_path / "bin" / "tiny" / "dict.txt").write_text("a 1\n")
    with pytest.raises(KnnlmError, match="no meta.json"):
        prepare_corpus("tiny", write_corpus(tmp_path / "raw"), tmp_path / "bin")


@pytest.mark.parametrize(
    "split, content, message",
    [
        ("train", None, "no such file"),
        ("valid", "", "empty"),
        ("train", " \n \n", "only blank lines"),
        ("test", b"caf\xe9 \n", "not UTF-8"),
    ],
)
def test_bad_input_errors_name_the_file_and_leave_nothing(tmp_path, split, content, message):
    paths = write_corpus(tmp_path / "raw")
    if content is None:
        paths[split].unlink()
    elif isinstance(content, bytes):
        paths[split].write_bytes(content)
    else:
        paths[split].write_text(content)
    dest = tmp_path / "bin"
    with pytest.raises(KnnlmError, match=message) as err:
        prepare_corpus("tiny", {s: RawSplit(p, option=f"--{s}") for s, p in paths.items()}, dest)
    assert str(paths[split]) in str(err.value)
    assert not dest.exists()


# --------------------------------------------------------------------------- WikiText sources


def test_wikitext_from_folder_checks_published_sha256(tmp_path):
    source = tmp_path / "raw"
    write_corpus(source)
    with pytest.raises(KnnlmError, match="--no-verify") as err:
        prepare_wikitext("wikitext-2", source, tmp_path / "bin")
    assert "wiki.train.tokens" in str(err.value)
    assert not (tmp_path / "bin").exists()
    out = prepare_wikitext("wikitext-2", source, tmp_path / "bin", verify=False)
    assert out.name == "wikitext-2"
    assert read_data_meta(out).sources["train"].check == "skipped (--no-verify)"


def test_wikitext_from_folder_with_matching_checksums(tmp_path, monkeypatch):
    paths = write_corpus(tmp_path / "raw")
    fake_wikitext(monkeypatch, sha256={s: sha256(p) for s, p in paths.items()})
    out = prepare_wikitext("wikitext-2", tmp_path / "raw", tmp_path / "bin")
    meta = read_data_meta(out)
    assert {s.check for s in meta.sources.values()} == {"sha256 matches the published one"}
    assert meta.dataset == "wikitext-2" and meta.splits["test"].tokens == 4


def test_wikitext_folder_missing_a_file(tmp_path):
    paths = write_corpus(tmp_path / "raw")
    paths["test"].unlink()
    with pytest.raises(KnnlmError, match="--from must name the folder") as err:
        prepare_wikitext("wikitext-2", tmp_path / "raw", tmp_path / "bin", verify=False)
    assert "wiki.test.tokens" in str(err.value)


def test_wikitext_from_zip_verifies_md5_and_extracts(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "wikitext-2-v1.zip")
    fake_wikitext(monkeypatch, archive_md5=md5(archive), sha256={})
    dest = tmp_path / "bin"
    out = prepare_wikitext("wikitext-2", archive, dest)
    meta = read_data_meta(out)
    assert meta.sources["train"].check.startswith("extracted from wikitext-2-v1.zip")
    assert meta.sources["train"].file.endswith("wikitext-2-v1.zip:wikitext-2/wiki.train.tokens")
    assert [meta.splits[s].tokens for s in SPLITS] == [TINY_COUNTS[s][1] for s in SPLITS]
    assert_only(dest, "wikitext-2")
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dict.txt", "meta.json", *(f"{s}.{e}" for s in SPLITS for e in ("bin", "idx"))]
    )


def test_wikitext_zip_with_wrong_md5_or_unreadable(tmp_path, monkeypatch):
    archive = make_zip(tmp_path / "wikitext-2-v1.zip")
    fake_wikitext(monkeypatch, archive_md5="0" * 32)
    with pytest.raises(KnnlmError, match="MD5") as err:
        prepare_wikitext("wikitext-2", archive, tmp_path / "bin")
    assert str(archive) in str(err.value)
    broken = tmp_path / "broken.zip"
    broken.write_bytes(b"not a zip archive")
    with pytest.raises(KnnlmError, match="unreadable zip") as err:
        prepare_wikitext("wikitext-2", broken, tmp_path / "bin", verify=False)
    assert str(broken) in str(err.value)
    assert not (tmp_path / "bin").exists()


def test_wikitext_download_checks_md5_and_keeps_archive(tmp_path, monkeypatch):
    (tmp_path / "served").mkdir()
    archive = make_zip(tmp_path / "served" / "wikitext-2-v1.zip")
    downloads = tmp_path / "downloads"
    fake_wikitext(monkeypatch, url=archive.as_uri(), archive_md5="f" * 32, sha256={})
    with pytest.raises(KnnlmError, match="MD5"):
        prepare_wikitext("wikitext-2", dest=tmp_path / "bin", downloads=downloads)
    assert list(downloads.iterdir()) == []
    fake_wikitext(monkeypatch, url=archive.as_uri(), archive_md5=md5(archive), sha256={})
    out = prepare_wikitext("wikitext-2", dest=tmp_path / "bin", downloads=downloads)
    assert read_data_meta(out).splits["train"].tokens == 16
    assert [p.name for p in downloads.iterdir()] == ["wikitext-2-v1.zip"]
    archive.unlink()  # a rebuild uses the kept download instead of the (now gone) mirror
    assert prepare_wikitext("wikitext-2", dest=tmp_path / "bin", downloads=downloads, force=True) == out


def test_unreachable_mirror_suggests_from(tmp_path, monkeypatch):
    fake_wikitext(monkeypatch, url=(tmp_path / "absent.zip").as_uri())
    with pytest.raises(KnnlmError, match="--from"):
        prepare_wikitext("wikitext-2", dest=tmp_path / "bin", downloads=tmp_path / "dl")


# --------------------------------------------------------------------------- SentencePiece BPE


def test_sentencepiece_counts_dictionary_and_model(text_slice, tmp_path):
    paths = {s: text_slice / f"wiki.{s}.tokens" for s in SPLITS}
    out = prepare_corpus("slice-bpe", paths, tmp_path, tokenization=Tokenization("sentencepiece", 300))
    meta = read_data_meta(out)
    assert meta.tokenization.kind == "sentencepiece" and meta.tokenization.vocab_size == 300
    assert meta.tokenization.model_sha256 == sha256(out / "spm.model")
    processor = spm.SentencePieceProcessor(model_file=str(out / "spm.model"))
    assert processor.get_piece_size() == 300
    dictionary = Dictionary.load(str(out / "dict.txt"))
    for split in SPLITS:
        lines = [" ".join(words) for words in count_words(paths[split])]
        pieces = processor.encode(lines, out_type=str)
        assert meta.splits[split].lines == len(lines)
        assert meta.splits[split].tokens == sum(len(p) + 1 for p in pieces)
        if split == "train":
            train_pieces = {p for line in pieces for p in line} - {"<unk>"}
            assert all(dictionary.index(p) != dictionary.unk() for p in train_pieces)
            # WikiText's literal <unk> stays one piece and becomes fairseq's <unk>
            assert meta.splits[split].unk == sum(words.count("<unk>") for words in count_words(paths[split]))
    assert_only(tmp_path, "slice-bpe")
    assert not any(p.name.startswith("_") for p in out.iterdir())


def test_sentencepiece_training_is_deterministic(tmp_path):
    train = write_corpus(tmp_path / "raw", {"train": TINY["train"] * 20 + " a cat and a dog \n"})["train"]
    models = []
    for run in range(2):
        model = tmp_path / f"run{run}.model"
        train_sentencepiece(train, model, vocab_size=30, seed=7, threads=1)
        models.append(model.read_bytes())
    assert models[0] == models[1]


def test_bpe_folder_name_and_vocab_size_errors(tmp_path):
    paths = write_corpus(tmp_path / "raw")
    with pytest.raises(KnnlmError, match="--vocab-size 5000 is too large"):
        prepare_corpus("t", paths, tmp_path / "bin", tokenization=Tokenization("sentencepiece", 5000))
    with pytest.raises(KnnlmError, match="--vocab-size is required"):
        prepare_corpus("t", paths, tmp_path / "bin", tokenization=Tokenization("sentencepiece"))
    with pytest.raises(KnnlmError, match="BPE only"):
        Tokenization("word", 100)
    out = prepare_wikitext(
        "wikitext-2",
        tmp_path / "raw",
        tmp_path / "bin",
        tokenization=Tokenization("sentencepiece", 24),
        verify=False,
    )
    assert out.name == "wikitext-2-bpe24"
    assert not (tmp_path / "bin" / "t").exists()


# --------------------------------------------------------------------------- reading meta.json


def test_read_data_meta_refuses_incomplete_or_changed_folders(word_bin, tmp_path):
    with pytest.raises(KnnlmError, match="no such data folder"):
        read_data_meta(tmp_path / "nothing")
    (tmp_path / "half").mkdir()
    with pytest.raises(KnnlmError, match="meta.json: missing"):
        read_data_meta(tmp_path / "half")
    out = prepare_corpus("tiny", write_corpus(tmp_path / "raw"), tmp_path / "bin")
    assert read_data_meta(out / "meta.json").path == out
    with open(out / "dict.txt", "a") as f:
        f.write("extra 1\n")
    with pytest.raises(KnnlmError, match="dict.txt: changed"):
        read_data_meta(out)
    assert read_data_meta(out, verify=False).name == "tiny"
    (out / "meta.json").write_text("{not json")
    with pytest.raises(KnnlmError, match="unreadable"):
        read_data_meta(out)


# --------------------------------------------------------------------------- command line


def test_cli_text_end_to_end(tmp_path, capsys):
    paths = write_corpus(tmp_path / "raw")
    argv = ["prepare", "text", "--name", "cli", "--dest", str(tmp_path / "bin")]
    argv += [a for s in SPLITS for a in (f"--{s}", str(paths[s]))]
    assert main(argv) == 0
    assert read_data_meta(tmp_path / "bin" / "cli").splits["valid"].tokens == 5
    assert main(argv) == 2
    assert "--force" in capsys.readouterr().err
    assert main([*argv, "--force", "--bpe", "sentencepiece", "--vocab-size", "24"]) == 0
    assert read_data_meta(tmp_path / "bin" / "cli").tokenization.vocab_size == 24
    capsys.readouterr()
    assert main([*argv[:-2], "--test", str(tmp_path / "none.txt"), "--force"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "none.txt: no such file" in err[0] and "--test" in err[0]


def test_cli_wikitext_errors_are_one_line(tmp_path, capsys):
    write_corpus(tmp_path / "raw")
    argv = ["prepare", "wikitext-2", "--from", str(tmp_path / "raw"), "--dest", str(tmp_path / "b")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("knnlm prepare: error:") and "--no-verify" in err[0]


def test_cli_demo_matches_documented_counts(tmp_path):
    assert main(["prepare", "demo", "--dest", str(tmp_path), "--workers", "2"]) == 0
    meta = read_data_meta(tmp_path / "demo")
    assert {s: (meta.splits[s].lines, meta.splits[s].tokens) for s in SPLITS} == DEMO_COUNTS
    assert meta.dataset == "demo" and meta.sources["train"].file.endswith("wiki.train.tokens.gz")


def test_demo_bpe_folder_uses_the_default_vocab_size(tmp_path):
    existing = tmp_path / "demo-bpe4000"
    existing.mkdir()
    (existing / "meta.json").write_text("{}")
    with pytest.raises(KnnlmError, match="demo-bpe4000 is already prepared"):
        prepare_demo(tmp_path, tokenization=Tokenization("sentencepiece"))
