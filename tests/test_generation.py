"""kNN-LM generation: the HF logits processor and ``knnlm generate`` against a float64 brute force of Eq. 5.

Tiny random models built here (GPT-2, Llama and GPT-NeoX layouts; the session's tiny fairseq
checkpoint), datastores of their own keys over random or corpus tokens, exact search: offline, CPU.
"""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from fairseq.data import data_utils

pytest.importorskip("transformers", reason="the hf extra is not installed (pip install -e .[hf])")

from knnlm.cli.main import build_parser  # noqa: E402
from knnlm.datastore import write_datastore  # noqa: E402
from knnlm.datastore.retriever import Retriever  # noqa: E402
from knnlm.errors import KnnlmError  # noqa: E402
from knnlm.generation.fairseq_lm import GenerateConfig, read_prompts, run_generate  # noqa: E402
from knnlm.generation.hf import KnnLogitsProcessor  # noqa: E402
from knnlm.io import dictionary_fingerprint  # noqa: E402
from knnlm.models.capture import KeyCapture  # noqa: E402
from knnlm.models.fairseq_lm import load_language_model  # noqa: E402
from knnlm.models.hf import HFKeyCapture, import_transformers  # noqa: E402
from knnlm.tasks import KnnInterpolatedLM  # noqa: E402

TOKENIZER_VOCAB = 64  # datastore values are ids below this
MODEL_VOCAB = 72  # the models' output layer is padded beyond the tokenizer
BOS, EOS, PAD = 0, 1, 2
HIDDEN = 32
FAMILIES = ("gpt2", "llama", "gpt_neox")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def build_hf_model(family: str) -> torch.nn.Module:
    transformers = import_transformers()
    torch.manual_seed(0)
    ids = {"vocab_size": MODEL_VOCAB, "bos_token_id": BOS, "eos_token_id": EOS, "pad_token_id": PAD}
    if family == "gpt2":
        config = transformers.GPT2Config(n_positions=64, n_embd=HIDDEN, n_layer=2, n_head=4, **ids)
        return transformers.GPT2LMHeadModel(config).eval()
    if family == "llama":
        config = transformers.LlamaConfig(
            hidden_size=HIDDEN,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **ids,
        )
        return transformers.LlamaForCausalLM(config).eval()
    config = transformers.GPTNeoXConfig(
        hidden_size=HIDDEN,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=64,
        **ids,
    )
    return transformers.GPTNeoXForCausalLM(config).eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    """Per family: the model and its att/ffn datastores (keys of random token sequences, next tokens)."""
    out = {}
    corpus = torch.randint(3, TOKENIZER_VOCAB, (6, 40), generator=torch.Generator().manual_seed(1))
    for family in FAMILIES:
        model = build_hf_model(family)
        capture = HFKeyCapture(model)
        with torch.no_grad():
            model(corpus, use_cache=False)
        stores = {}
        for key_type in ("att", "ffn"):
            keys = capture.pop(key_type)[:, :-1].reshape(-1, HIDDEN).numpy().astype(np.float16)
            stores[key_type] = write_datastore(
                tmp_path_factory.mktemp(f"{family}-{key_type}") / "ds",
                keys,
                corpus[:, 1:].reshape(-1).numpy(),
                key_type=key_type,
                source={"synthetic": f"{family}, random tokens, seed 1"},
            )
        capture.remove()
        out[family] = (model, stores)
    return out


def retriever(store, similarity: str) -> Retriever:
    return Retriever.open(store, similarity=similarity, device="cpu")


def brute_force_eq5(
    logits: np.ndarray,
    query: np.ndarray,
    keys: np.ndarray,
    vals: np.ndarray,
    *,
    k: int,
    temperature: float,
    lam: float,
    similarity: str,
) -> np.ndarray:
    """log((1 − λ)·softmax(logits) + λ·p_kNN) of one row, float64, loops over the datastore."""
    logits = logits.astype(np.float64)
    p_lm = np.exp(logits - logits.max())
    p_lm /= p_lm.sum()
    q = query.astype(np.float32).astype(np.float64)  # the retriever searches float32 queries
    scores = np.empty(len(keys))
    for j, key in enumerate(keys.astype(np.float64)):
        scores[j] = q @ key if similarity == "ip" else -((q - key) ** 2).sum()
    top = np.argsort(-scores, kind="stable")[:k]
    weights = np.exp((scores[top] - scores[top].max()) / temperature)
    weights /= weights.sum()
    p_knn = np.zeros(len(logits))
    for j, w in zip(top, weights, strict=True):
        p_knn[vals[j]] += w
    with np.errstate(divide="ignore"):
        return np.log((1 - lam) * p_lm + lam * p_knn)


def hf_reference(model, sequences: torch.Tensor, key_type: str) -> tuple[np.ndarray, np.ndarray]:
    """Last-position logits and key of a full, cache-free forward of ``sequences``."""
    capture = HFKeyCapture(model)
    try:
        with torch.no_grad():
            logits = model(sequences, use_cache=False).logits[:, -1]
        return logits.double().numpy(), capture.pop(key_type)[:, -1].float().numpy()
    finally:
        capture.remove()


def left_padded(prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


PROMPTS = [[5, 17, 33, 8, 40], [12, 9], [30, 31, 3, 44]]
MODES = {
    "greedy": {"do_sample": False},
    "sample": {"do_sample": True, "top_k": 0},
    "beam": {"do_sample": False, "num_beams": 3},
}


def hf_generate(model, processor=None, mode: str = "greedy", **kwargs) -> torch.Tensor:
    ids, mask = left_padded(PROMPTS)
    torch.manual_seed(7)
    kwargs = {"max_new_tokens": 6, "pad_token_id": PAD, **MODES[mode], **kwargs}
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, logits_processor=[processor] if processor else None, **kwargs)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("key_type,similarity,temperature", [("att", "l2", 2.0), ("ffn", "ip", 0.7)])
def test_processor_equals_brute_force_eq5(hf, family, key_type, similarity, temperature):
    """Every step of a cached greedy generation: the processed scores are Eq. 5 over the full vocabulary."""
    model, stores = hf[family]
    store, k, lam = stores[key_type], 8, 0.4
    prompts = torch.tensor([PROMPTS[0], [6, 7, 8, 9, 10]])
    with KnnLogitsProcessor(model, retriever(store, similarity), k=k, lmbda=lam, temperature=temperature) as knn:
        out = model.generate(
            prompts,
            attention_mask=torch.ones_like(prompts),
            logits_processor=[knn],
            max_new_tokens=4,
            do_sample=False,
            pad_token_id=PAD,
            output_scores=True,
            return_dict_in_generate=True,
        )
    keys, vals = np.asarray(store.keys), np.asarray(store.vals)
    for step, got in enumerate(out.scores):
        assert got.shape == (2, MODEL_VOCAB) and got.dtype == torch.float32
        logits, queries = hf_reference(model, out.sequences[:, : prompts.shape[1] + step], key_type)
        for row in range(2):
            want = brute_force_eq5(
                logits[row], queries[row], keys, vals, k=k, temperature=temperature, lam=lam, similarity=similarity
            )
            np.testing.assert_allclose(got[row].double().numpy(), want, rtol=0, atol=2e-4)
            assert math.isclose(float(torch.logsumexp(got[row].double(), 0)), 0.0, abs_tol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", list(MODES))
def test_lambda_zero_generates_what_plain_generate_does(hf, family, mode):
    model, stores = hf[family]
    plain = hf_generate(model, mode=mode)
    with KnnLogitsProcessor(model, retriever(stores["att"], "l2"), k=8, lmbda=0.0) as knn:
        assert torch.equal(hf_generate(model, knn, mode=mode), plain)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["greedy", "beam"])
def test_kv_cache_on_and_off_agree(hf, family, mode):
    """Cached steps see one token, uncached ones the whole sequence: the query is the last position either way."""
    model, stores = hf[family]
    with KnnLogitsProcessor(model, retriever(stores["ffn"], "l2"), k=8, lmbda=0.6, temperature=3.0) as knn:
        cached = hf_generate(model, knn, mode=mode, use_cache=True)
        uncached = hf_generate(model, knn, mode=mode, use_cache=False)
    assert torch.equal(cached, uncached)
    assert not torch.equal(cached, hf_generate(model, mode=mode))  # the datastore changed the outcome


def test_left_padded_rows_generate_what_they_generate_alone(hf):
    model, stores = hf["llama"]
    with KnnLogitsProcessor(model, retriever(stores["att"], "ip"), k=8, lmbda=0.5) as knn:
        batch = hf_generate(model, knn)
        for row, prompt in enumerate(PROMPTS):
            alone = model.generate(
                torch.tensor([prompt]),
                attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                logits_processor=[knn],
                max_new_tokens=6,
                do_sample=False,
                pad_token_id=PAD,
            )
            assert batch[row, -6:].tolist() == alone[0, -6:].tolist()


def test_processor_refuses_misaligned_rows_and_foreign_values(hf):
    model, stores = hf["gpt2"]
    knn = KnnLogitsProcessor(model, retriever(stores["att"], "l2"), k=4)
    try:
        with pytest.raises(KnnlmError, match="no captured key"):
            knn(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, MODEL_VOCAB))
        with torch.no_grad():
            model(torch.tensor([[4, 5, 6], [7, 8, 9]]))
        with pytest.raises(KnnlmError, match="2 rows but the scores have 3"):
            knn(torch.zeros(3, 3, dtype=torch.long), torch.zeros(3, MODEL_VOCAB))
        with pytest.raises(KnnlmError, match="another tokenizer"):
            knn.mix(torch.zeros(1, 3), torch.zeros(1, HIDDEN))
    finally:
        knn.remove()
    with pytest.raises(KnnlmError, match="'ffn' keys were asked"):
        KnnLogitsProcessor(model, retriever(stores["att"], "l2"), key_type="ffn")
    with pytest.raises(KnnlmError, match="lmbda"):
        KnnLogitsProcessor(model, retriever(stores["att"], "l2"), lmbda=1.5)


# --------------------------------------------------------------------------- fairseq: knnlm generate


@pytest.fixture(scope="module")
def fairseq_lm(tiny_checkpoint, tiny_data_bin, tmp_path_factory):
    """The tiny checkpoint, an att datastore of its keys over the valid split, and prompts of its words."""
    lm, task = load_language_model(tiny_checkpoint, tiny_data_bin)
    lm.eval()
    dictionary = task.source_dictionary
    lines = data_utils.load_indexed_dataset(str(tiny_data_bin / "valid"), dictionary)
    stream = torch.cat([lines[i] for i in range(len(lines))])[:600].view(10, 60)
    with torch.no_grad(), KeyCapture(lm.decoder) as capture:
        lm(stream)
        keys = capture.pop("att")[:, :-1].reshape(-1, capture_dim(lm)).numpy()
    store = tmp_path_factory.mktemp("fairseq-ds") / "att"
    write_datastore(
        store,
        keys.astype(np.float16),
        stream[:, 1:].reshape(-1).numpy(),
        key_type="att",
        source={"dictionary_sha256": dictionary_fingerprint(dictionary), "synthetic": "valid keys"},
    )
    words = [dictionary[int(i)] for i in stream[5, 10:30]]
    prompt_file = tmp_path_factory.mktemp("prompts") / "prompts.txt"
    prompt_file.write_text(f"{' '.join(words[:4])}\n{' '.join(words[4:11])}\n{' '.join(words[11:15])}\n")
    return lm, task, store, prompt_file


def capture_dim(lm) -> int:
    return lm.decoder.layers[-1].fc1.in_features


def config(fairseq_lm, tiny_checkpoint, tiny_data_bin, **overrides) -> GenerateConfig:
    _, _, store, prompt_file = fairseq_lm
    values = {
        "checkpoint": str(tiny_checkpoint),
        "data": str(tiny_data_bin),
        "datastore": str(store),
        "prompt_file": str(prompt_file),
        "similarity": "l2",
        "k": 8,
        "max_new_tokens": 5,
        "device": "cpu",
    }
    return GenerateConfig(**{**values, **overrides})


def plain_fairseq(lm, task, ids: list[int], new_tokens: int, beam: int = 1, sampling: bool = False) -> list[int]:
    """fairseq's own SequenceGenerator on the bare LM, one prompt."""
    from fairseq import search
    from fairseq.sequence_generator import SequenceGenerator

    dictionary = task.source_dictionary
    generator = SequenceGenerator(
        [lm],
        dictionary,
        beam_size=beam,
        max_len_b=len(ids) + new_tokens,
        search_strategy=search.Sampling(dictionary) if sampling else None,
    )
    tokens = torch.tensor([ids])
    sample = {"net_input": {"src_tokens": tokens, "src_lengths": torch.tensor([len(ids)])}}
    best = task.inference_step(generator, [lm], sample, prefix_tokens=tokens)[0][0]["tokens"][len(ids) :].tolist()
    return best[:-1] if best and best[-1] == dictionary.eos() else best


@pytest.mark.parametrize("beam,sampling", [(1, False), (3, False), (1, True)])
def test_generate_lambda_zero_equals_plain_sequence_generator(
    fairseq_lm, tiny_checkpoint, tiny_data_bin, tmp_path, beam, sampling
):
    lm, task, _, prompt_file = fairseq_lm
    if sampling:  # one prompt: the random stream is then consumed in the same order
        prompt_file = tmp_path / "one.txt"
        prompt_file.write_text(fairseq_lm[3].read_text().splitlines()[1] + "\n")
    out = tmp_path / "gen.jsonl"
    options = {
        "checkpoint": tiny_checkpoint, "data": tiny_data_bin, "datastore": fairseq_lm[2], "similarity": "l2",
        "prompt-file": prompt_file, "lmbda": 0, "k": 8, "beam": beam, "max-new-tokens": 6, "device": "cpu",
        "seed": 3, "out": out,
    }  # fmt: skip
    args = ["generate", *(f"--{name}={value}" for name, value in options.items()), *(["--sampling"] * sampling)]
    parsed = build_parser().parse_args(args)
    parsed.func(parsed)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = read_prompts(prompt_file, task.source_dictionary)
    assert [r["prompt"] for r in records] == [text for text, _ in prompts]
    for record, (_, ids) in zip(records, prompts, strict=True):
        torch.manual_seed(3)
        assert record["tokens"] == plain_fairseq(lm, task, ids, 6, beam=beam, sampling=sampling)
        assert record["prompt_tokens"] == ids and record["settings"]["lmbda"] == 0
        assert record["continuation"] == task.source_dictionary.string(torch.tensor(record["tokens"]))


def fairseq_reference(lm, tokens: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Last-position logits and att key of a full forward of ``tokens``, no incremental state."""
    with torch.no_grad(), KeyCapture(lm.decoder) as capture:
        logits = lm(tokens)[0][:, -1]
        return logits.double().numpy(), capture.pop("att")[:, -1].float().numpy()


@pytest.mark.parametrize("similarity,temperature", [("l2", 3.0), ("ip", 1.0)])
def test_fairseq_incremental_distribution_equals_brute_force(fairseq_lm, similarity, temperature):
    """What SequenceGenerator reads at each incremental step is Eq. 5 of the whole prefix."""
    from fairseq.sequence_generator import EnsembleModel

    lm, task, store_path, _ = fairseq_lm
    store = Retriever.open(store_path, similarity=similarity, device="cpu").store
    k, lam = 8, 0.4
    model = KnnInterpolatedLM(
        lm,
        Retriever.open(store, similarity=similarity, device="cpu"),
        k,
        lmbda=lam,
        temperature=temperature,
        key_type="att",
        full_distribution=True,
    )
    ensemble = EnsembleModel([model])
    eos = task.source_dictionary.eos()
    tokens = torch.tensor([[eos, 10, 11, 12, 13, 14], [eos, 20, 21, 22, 23, 24]])
    incremental = [{}]
    for step in range(tokens.shape[1]):
        with torch.no_grad():
            got, _ = ensemble.forward_decoder(tokens[:, : step + 1], None, incremental)
        logits, queries = fairseq_reference(lm, tokens[:, : step + 1])
        for row in range(2):
            want = brute_force_eq5(
                logits[row],
                queries[row],
                np.asarray(store.keys),
                np.asarray(store.vals),
                k=k,
                temperature=temperature,
                lam=lam,
                similarity=similarity,
            )
            np.testing.assert_allclose(got[row].double().numpy(), want, rtol=0, atol=2e-4)
    model.capture.remove()


def test_generate_greedy_follows_the_argmax_of_eq5(fairseq_lm, tiny_checkpoint, tiny_data_bin):
    """End to end with λ > 0: each generated word is the argmax of the brute-force Eq. 5 of its prefix."""
    lm, task, _, _ = fairseq_lm
    cfg = config(fairseq_lm, tiny_checkpoint, tiny_data_bin, lmbda=0.7, knn_temp=2.0)
    store = Retriever.open(cfg.datastore, similarity="l2", device="cpu").store
    records = run_generate(cfg)
    eos = task.source_dictionary.eos()
    changed = False
    for record in records:
        sequence = [eos, *record["prompt_tokens"]]
        for token in [*record["tokens"], *([eos] if record["stopped"] == "eos" else [])]:
            logits, query = fairseq_reference(lm, torch.tensor([sequence]))
            want = brute_force_eq5(
                logits[0],
                query[0],
                np.asarray(store.keys),
                np.asarray(store.vals),
                k=cfg.k,
                temperature=cfg.knn_temp,
                lam=cfg.lmbda,
                similarity="l2",
            )
            want[task.source_dictionary.pad()] = -np.inf  # fairseq never picks padding
            assert token == int(np.argmax(want))
            changed |= token != int(np.argmax(logits[0]))
            sequence.append(token)
    assert changed  # the datastore steered at least one step


def test_generate_refuses_bad_prompts(fairseq_lm, tiny_checkpoint, tiny_data_bin, tmp_path):
    dictionary = fairseq_lm[1].source_dictionary
    with pytest.raises(KnnlmError, match="--prompt-file .* does not exist"):
        run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, prompt_file=str(tmp_path / "nope.txt")))
    (tmp_path / "empty_line.txt").write_text(f"{dictionary[10]}\n\n")
    with pytest.raises(KnnlmError, match="line 2 is empty"):
        read_prompts(tmp_path / "empty_line.txt", dictionary)
    (tmp_path / "unknown.txt").write_text(f"{dictionary[10]} zzqxunknownword {dictionary.unk_word}\n")
    with pytest.raises(KnnlmError, match="line 1: 'zzqxunknownword' not in the dictionary"):
        read_prompts(tmp_path / "unknown.txt", dictionary)
    (tmp_path / "blank.txt").write_text("")
    with pytest.raises(KnnlmError, match="holds no prompt"):
        read_prompts(tmp_path / "blank.txt", dictionary)
    with pytest.raises(KnnlmError, match="--sampling-topk"):
        run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, sampling_topk=5))
    with pytest.raises(KnnlmError, match="--lmbda"):
        run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, lmbda=1.5))


def test_generate_options_are_the_config_fields():
    commands = {a.dest: a for a in build_parser()._subparsers._group_actions}["command"].choices  # noqa: SLF001
    parser = commands["generate"]
    assert {a.dest for a in parser._actions if a.option_strings and a.dest != "help"} == {  # noqa: SLF001
        f.name for f in dataclasses.fields(GenerateConfig)
    }
    assert all(f.metadata.get("help") for f in dataclasses.fields(GenerateConfig))


def test_generate_prints_each_prompt_and_its_continuation(fairseq_lm, tiny_checkpoint, tiny_data_bin, capsys):
    """Without --out: one line per prompt, in the file's order, prompt and continuation tab-separated."""
    cfg = config(fairseq_lm, tiny_checkpoint, tiny_data_bin, lmbda=0.5, beam=2, batch_size=1)
    given = {name: value for name, value in dataclasses.asdict(cfg).items() if value not in (None, False)}
    parsed = build_parser().parse_args(["generate", *(f"--{k.replace('_', '-')}={v}" for k, v in given.items())])
    assert GenerateConfig(**{f.name: getattr(parsed, f.name) for f in dataclasses.fields(GenerateConfig)}) == cfg
    parsed.func(parsed)
    lines = [line.split("\t") for line in capsys.readouterr().out.splitlines()]
    assert [line[0] for line in lines] == fairseq_lm[3].read_text().splitlines()
    assert all(len(line) == 2 and line[1] for line in lines)


def test_generate_min_new_tokens_bars_the_end_of_line(fairseq_lm, tiny_checkpoint, tiny_data_bin):
    """--min-new-tokens = --max-new-tokens: continuations of exactly that length, where some would have ended."""
    eos = fairseq_lm[1].source_dictionary.eos()
    knobs = {"lmbda": 0.5, "sampling": True, "max_new_tokens": 40, "batch_size": 2, "seed": 5}
    free = run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, **knobs))
    assert any(r["stopped"] == "eos" for r in free)  # the tiny LM likes </s>: the bar has work to do
    fixed = run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, **knobs, min_new_tokens=40))
    assert all(len(r["tokens"]) == 40 and eos not in r["tokens"] and r["stopped"] == "length" for r in fixed)
    assert all(r["seconds"] > 0 for r in fixed) and fixed[0]["settings"]["min_new_tokens"] == 40
    with pytest.raises(KnnlmError, match="--min-new-tokens 41 exceeds --max-new-tokens 40"):
        run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, **{**knobs, "min_new_tokens": 41}))


def test_lambda_zero_never_searches(fairseq_lm, tiny_checkpoint, tiny_data_bin, monkeypatch):
    """λ = 0 is the LM alone: generating costs no search (and its words are those of λ = 0 with a search)."""

    def refuse(*args, **kwargs):
        raise AssertionError("searched at λ = 0")

    monkeypatch.setattr(Retriever, "search", refuse)
    records = run_generate(config(fairseq_lm, tiny_checkpoint, tiny_data_bin, lmbda=0.0, max_new_tokens=4))
    assert len(records) == 3 and all(r["tokens"] for r in records)
