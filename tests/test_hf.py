"""Hugging Face causal LMs as base models: tiny GPT-2 and Llama built from configs, a tokenizer trained here.

Nothing is downloaded: the models are random, saved with save_pretrained and loaded by path
(the same loader as a hub name), the tokenizer is a byte-level BPE trained on a few lines.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e .[hf])")
pytest.importorskip("tokenizers", reason="the hf extra is not installed (pip install -e .[hf])")

from knnlm.errors import KnnlmError  # noqa: E402
from knnlm.models.hf import HFCausalLM, HFKeyCapture, check_available, import_transformers  # noqa: E402
from knnlm.models.hf_text import read_lines, token_words  # noqa: E402

LINES = {"train": 120, "valid": 30, "test": 30}
EOT = "<|endoftext|>"


@pytest.fixture(scope="module")
def text_dir(text_slice, tmp_path_factory) -> Path:
    """A few lines of each split, as raw text files (the WikiText layout)."""
    out = tmp_path_factory.mktemp("hf-text")
    for split, n in LINES.items():
        lines = (text_slice / f"wiki.{split}.tokens").read_text(encoding="utf-8").splitlines(keepends=True)
        (out / f"wiki.{split}.tokens").write_text("".join(lines[:n]), encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def tokenizer(text_dir):
    """A GPT-2-style byte-level BPE with a small vocabulary, so that words split into pieces."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    transformers = import_transformers()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train([str(text_dir / "wiki.train.tokens")], trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=EOT, eos_token=EOT)


def _save(model, tokenizer, path: Path) -> Path:
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _gpt2(tokenizer, seed: int = 0):
    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer), n_positions=64, n_embd=32, n_layer=2, n_head=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.GPT2LMHeadModel(config).eval()


def _llama(tokenizer, seed: int = 0):
    transformers = import_transformers()
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
    )
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def gpt2_dir(tokenizer, tmp_path_factory) -> Path:
    return _save(_gpt2(tokenizer), tokenizer, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="module")
def llama_dir(tokenizer, tmp_path_factory) -> Path:
    return _save(_llama(tokenizer), tokenizer, tmp_path_factory.mktemp("llama"))


def _ids(tokenizer, text_dir: Path, n: int = 40) -> torch.Tensor:
    text = (text_dir / "wiki.valid.tokens").read_text(encoding="utf-8")
    return torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"][:n]])


def test_gpt2_keys_equal_values_recomputed_from_the_last_block(tokenizer, text_dir):
    model = _gpt2(tokenizer)
    x = _ids(tokenizer, text_dir)
    capture = HFKeyCapture(model)
    with torch.no_grad():
        out = model(input_ids=x, output_hidden_states=True)
        att, ffn = capture.pop("att"), capture.pop("ffn")
        block, ln_f = model.transformer.h[-1], model.transformer.ln_f
        h = out.hidden_states[-2]  # input of the last block
        residual = h + block.attn(block.ln_1(h))[0]
        expected_att = block.ln_2(residual)
        expected_ffn = ln_f(residual + block.mlp(expected_att))
    capture.remove()
    torch.testing.assert_close(att, expected_att, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ffn, expected_ffn, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(model.lm_head(ffn), out.logits, rtol=1e-5, atol=1e-5)


def test_llama_keys_are_the_mlp_input_and_the_final_norm_output(tokenizer, text_dir):
    model = _llama(tokenizer)
    x = _ids(tokenizer, text_dir)
    layer = model.model.layers[-1]
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        layer.post_attention_layernorm.register_forward_hook(lambda m, i, o: seen.__setitem__("pre_mlp", i[0])),
        model.model.norm.register_forward_hook(lambda m, i, o: seen.__setitem__("pre_norm", i[0])),
    ]
    capture = HFKeyCapture(model)
    with torch.no_grad():
        logits = model(input_ids=x).logits
        att, ffn = capture.pop("att"), capture.pop("ffn")
        expected_att = layer.post_attention_layernorm(seen["pre_mlp"])
        expected_ffn = model.model.norm(seen["pre_norm"])
    for h in hooks:
        h.remove()
    torch.testing.assert_close(att, expected_att)
    torch.testing.assert_close(ffn, expected_ffn)
    torch.testing.assert_close(model.lm_head(ffn), logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_target_logprobs_equal_the_model_loss(arch, tokenizer, text_dir, request):
    lm = HFCausalLM.load(str(request.getfixturevalue(f"{arch}_dir")))
    x = _ids(tokenizer, text_dir)
    with torch.no_grad():
        loss = lm.model(input_ids=x, labels=x).loss
        n = x.shape[1] - 1
        lp = lm.target_logprobs(x, torch.zeros(n, dtype=torch.long), torch.arange(n), x[0, 1:])
    torch.testing.assert_close(-lp.mean(), loss, rtol=1e-5, atol=1e-6)


def test_dump_logprobs_equal_the_model_loss_on_the_split(gpt2_dir, text_dir, tmp_path):
    """One window (T > tokens): the dump scores every token from </s>-prefixed context, as the model's loss."""
    from knnlm.evaluation.dump import LMDumpConfig, dump_lm

    n = 50
    out = dump_lm(LMDumpConfig(checkpoint=None, hf_model=str(gpt2_dir), data=str(text_dir), out=str(tmp_path / "c"),
                               tokens_per_sample=64, context_window=8, limit_tokens=n, device="cpu"))
    lm = HFCausalLM.load(str(gpt2_dir))
    split = lm.load_split(text_dir, "valid")
    x = torch.from_numpy(np.concatenate([[lm.prefix], split.stream.targets(0, n)]))[None]
    with torch.no_grad():
        loss = lm.model(input_ids=x, labels=x).loss
    dumped = np.load(out / "lm_logprob.npy").astype(np.float64)
    assert dumped.shape == (n,)
    assert -dumped.mean() == pytest.approx(float(loss), rel=1e-5)


def test_sliding_window_target_sees_the_window_before_it(gpt2_dir, text_dir, tmp_path):
    """T=16, C=12 (stride 4): target p of window [s, e) is predicted from S[s-12 : p+1] only."""
    from knnlm.evaluation.dump import LMDumpConfig, dump_lm

    out = dump_lm(LMDumpConfig(checkpoint=None, hf_model=str(gpt2_dir), data=str(text_dir), out=str(tmp_path / "c"),
                               tokens_per_sample=16, context_window=12, limit_tokens=40, device="cpu"))
    lm = HFCausalLM.load(str(gpt2_dir))
    stream = lm.load_split(text_dir, "valid").stream
    dumped = np.load(out / "lm_logprob.npy")
    positions = np.load(out / "positions.npy")
    p = 30  # window targets [28, 32), input S[16:32] = stream[15:31]
    x = torch.from_numpy(stream.sources(16, p + 1))[None]
    with torch.no_grad():
        expected = torch.log_softmax(lm.model(input_ids=x).logits[0, -1].float(), -1)[int(stream.targets(p, p + 1)[0])]
    assert positions[p] == 14
    assert float(dumped[p]) == pytest.approx(float(expected), abs=1e-5)


def test_word_ids_merge_pieces_back_into_words(tokenizer, text_dir):
    line = read_lines(text_dir / "wiki.valid.tokens")[1]
    enc = tokenizer(line, add_special_tokens=False, return_offsets_mapping=True)
    words = token_words(line, enc["offset_mapping"])
    assert words == sorted(words)
    pieces: dict[int, str] = {}
    for w, tok_id in zip(words, enc["input_ids"], strict=True):
        pieces[w] = pieces.get(w, "") + tokenizer.decode([tok_id])
    expected = [*line.split(), "\n"]
    assert len(pieces) == len(expected) and len(enc["input_ids"]) > len(expected)  # sub-word pieces
    assert [pieces[i].strip(" ") or pieces[i] for i in range(len(expected))] == expected


def _cli(*args: str) -> None:
    from knnlm.cli.main import main

    assert main(list(args)) == 0


def test_datastore_and_evaluation_round_trip(gpt2_dir, tokenizer, text_dir, tmp_path, capsys):
    """datastore build -> eval dump -> exact retrieve -> score, through the same commands as fairseq models."""
    from knnlm.datastore import Datastore
    from knnlm.evaluation.cache import Cache

    hf = ["--hf-model", str(gpt2_dir), "--data", str(text_dir), "--tokens-per-sample", "32", "--context-window", "16",
          "--device", "cpu"]
    _cli("datastore", "build", *hf, "--out", str(tmp_path / "ds"), "--max-tokens", "256")
    store = Datastore.open(tmp_path / "ds" / "att")
    lm = HFCausalLM.load(str(gpt2_dir))
    train = lm.load_split(text_dir, "train").stream
    assert store.num_keys == len(train) and store.key_dim == 32
    assert np.array_equal(np.asarray(store.vals), train.targets(0, len(train)))
    assert store.meta["source"]["base_model"]["kind"] == "hf"
    for split in ("valid", "test"):
        _cli("eval", "dump", *hf, "--split", split, "--out", str(tmp_path / split))
        _cli("eval", "retrieve", "--cache", str(tmp_path / split), "--datastore", str(tmp_path / "ds" / "att"),
             "--similarity", "l2", "--k-max", "16", "--device", "cpu")
    printed = capsys.readouterr().out
    assert "per token" in printed and "per word" in printed
    cache = Cache(tmp_path / "valid")
    units = cache.meta["units"]
    text = (text_dir / "wiki.valid.tokens").read_text(encoding="utf-8")
    assert units["n_words"] == len(text.split()) + text.count("\n")
    assert units["n_words"] < cache.n_tokens
    _cli("score", "--valid-cache", str(tmp_path / "valid"), "--test-cache", str(tmp_path / "test"),
         "--out", str(tmp_path / "results.jsonl"), "--key-type", "att", "--similarity", "l2",
         "--mask-source", "real", "--score-source", "real", "--k", "16", "--label", "model=gpt2")
    line = json.loads((tmp_path / "results.jsonl").read_text().splitlines()[0])
    m = line["metrics"]
    lm_lp = Cache(tmp_path / "test").lm_logprob.astype(np.float64)
    assert m["lm_ppl"] == pytest.approx(math.exp(-lm_lp.mean()), rel=1e-6)
    assert m["lm_word_ppl"] == pytest.approx(math.exp(-lm_lp.sum() / m["n_words"]), rel=1e-6)
    assert m["interp_word_ppl"] <= m["lm_word_ppl"] * (1 + 1e-9)
    _cli("report", str(tmp_path / "results.jsonl"), "--out", str(tmp_path / "report"), "--only", "xu2023_table4",
         "--where", "k=16", "--where", "split=test", "--where", "lambda=tune", "--where", "mask_source=real",
         "--where", "score_source=real")
    table = (tmp_path / "report" / "xu2023_table4.md").read_text()
    assert f"| GPT-2 small | {m['lm_ppl']:.2f} | {m['interp_ppl']:.2f} | {m['lm_word_ppl']:.2f} |" in table


def test_cache_of_another_model_is_refused(gpt2_dir, tokenizer, text_dir, tmp_path):
    from knnlm.datastore import DatastoreBuildConfig, build_datastore
    from knnlm.evaluation.dump import LMDumpConfig, RetrievalConfig, dump_lm, dump_retrieval

    other = _save(_gpt2(tokenizer, seed=1), tokenizer, tmp_path / "other")
    build_datastore(DatastoreBuildConfig(hf_model=str(gpt2_dir), data=str(text_dir), out=str(tmp_path / "ds"),
                                         split="valid", key_types=["att"], tokens_per_sample=32, device="cpu"))
    dump_lm(LMDumpConfig(checkpoint=None, hf_model=str(other), data=str(text_dir), out=str(tmp_path / "c"),
                         tokens_per_sample=32, limit_tokens=20, device="cpu"))
    with pytest.raises(KnnlmError, match="same --hf-model"):
        dump_retrieval(RetrievalConfig(cache=str(tmp_path / "c"), datastore=str(tmp_path / "ds" / "att"),
                                       similarity="l2", k_max=4, device="cpu"))


def test_clear_errors(gpt2_dir, text_dir, tmp_path, monkeypatch):
    from knnlm.models.factory import open_base_lm

    with pytest.raises(KnnlmError, match="pass only one"):
        open_base_lm("ckpt.pt", str(gpt2_dir), str(text_dir))
    with pytest.raises(KnnlmError, match="no raw text of split 'nope'"):
        HFCausalLM.load(str(gpt2_dir)).load_split(text_dir, "nope")
    with pytest.raises(KnnlmError, match="no such folder"):
        open_base_lm(None, str(tmp_path / "missing"), str(text_dir))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(KnnlmError, match="not in the local Hugging Face cache"):
        open_base_lm(None, "knnlm-tests/no-such-model", str(text_dir))
    with pytest.raises(KnnlmError, match="hub is switched off"):
        check_available("knnlm-tests/no-such-model")
    assert check_available(str(gpt2_dir)) == "folder"
    monkeypatch.setitem(__import__("sys").modules, "transformers", None)
    with pytest.raises(KnnlmError, match=r"pip install -e \.\[hf\]"):
        open_base_lm(None, "gpt2", str(text_dir))
