"""What the kNN-LM retrieved for one token of a cache: the view behind ``knnlm inspect``.

For a cached token it gathers the target, the LM, kNN and interpolated probabilities
(computed by :mod:`knnlm.scoring`, Eq. 5), the top neighbours with their scores,
weights, values and contexts, and the kNN mass per distinct value. Contexts are
read back from the token streams the artifacts record: a cache token ``t`` is
target ``t`` of its split (``meta.json`` ``dump.data`` and ``split``), and a
datastore entry is target :meth:`~knnlm.datastore.store.Datastore.positions_of`
of :meth:`~knnlm.datastore.store.Datastore.split_source`. Both are checked
against the recorded data fingerprints before any word is shown. Where the text
cannot be recovered (an old or synthetic datastore, a moved data folder), scores
and values are still shown, with a note saying why the words are missing.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from knnlm import scoring
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError
from knnlm.evaluation.cache import Cache, Retrieval
from knnlm.evaluation.score import TUNE, ScoreSetting, score
from knnlm.io import dictionary_fingerprint
from knnlm.models.windows import TokenStream

DEFAULT_CONTEXT_WORDS = 12
DICT_FILE = "dict.txt"


@dataclass(frozen=True)
class SplitText:
    """A split of a fairseq data-bin as words: its token stream and the dictionary's symbols."""

    data: Path
    split: str
    stream: TokenStream
    symbols: list[str]

    def word(self, token: int) -> str:
        return self.symbols[token] if 0 <= token < len(self.symbols) else f"#{token}"

    def words(self, start: int, end: int) -> list[str]:
        """The words of ``stream[start:end]`` (``start`` clipped at the split's beginning)."""
        return [self.word(int(t)) for t in self.stream.targets(max(0, start), end)]


def load_dictionary(data: str | Path) -> Any:
    """The fairseq ``Dictionary`` of ``DATA/dict.txt``: ids as the model saw them (specials first)."""
    from fairseq.data import Dictionary

    path = Path(data) / DICT_FILE
    if not path.is_file():
        raise KnnlmError(
            f"{path} is missing: {data} is not the fairseq data-bin the artifacts were made from; pass --data DATA_BIN"
        )
    return Dictionary.load(str(path))


def open_split_text(data: str | Path, split: str, data_sha256: str | None, what: str) -> SplitText:
    """Split ``split`` of ``data``, refused unless its files hash to ``data_sha256`` (what ``what`` recorded)."""
    from knnlm.models.fairseq_lm import load_split

    dictionary = load_dictionary(data)
    stream, sha = load_split(data, split, dictionary)
    if data_sha256 is not None and sha != data_sha256:
        raise KnnlmError(
            f"split {split!r} of {data} is not the one {what} was made from (data fingerprint {sha[:12]}, "
            f"recorded {data_sha256[:12]}); pass --data with the data-bin it was made from"
        )
    return SplitText(Path(data), split, stream, list(dictionary.symbols))


@dataclass(frozen=True)
class Neighbour:
    """One retrieved datastore entry, in the mask source's order (rank 1 is the best)."""

    rank: int
    row: int
    score: float
    weight: float  # share of the kNN mass after mask-to-k and the softmax at τ
    value: int
    value_text: str
    is_target: bool
    context: list[str] | None  # the words before the entry's position in its split; None: not recoverable


@dataclass(frozen=True)
class ValueMass:
    """The kNN mass one distinct value got (``M`` of Eq. 5 applied to the weights)."""

    value: int
    text: str
    mass: float
    neighbours: int
    is_target: bool


@dataclass
class TokenView:
    """Everything ``knnlm inspect`` shows for one cached token."""

    cache: str
    split: str
    retrieval: str
    position: int
    n_tokens: int
    target: int
    target_text: str
    context: list[str] | None
    lm_logprob: float
    knn_logprob: float
    interp_logprob: float
    k: int
    kept: int
    temperature: float
    lam: float
    lam_source: str
    neighbours: list[Neighbour]
    masses: list[ValueMass]
    notes: list[str] = field(default_factory=list)

    @property
    def probabilities(self) -> dict[str, float]:
        """``p_LM``, ``p_kNN`` and the interpolated ``p`` of the target."""
        return {
            name: math.exp(lp)
            for name, lp in (("lm", self.lm_logprob), ("knn", self.knn_logprob), ("interp", self.interp_logprob))
        }


def tuned_lambda(valid: Cache, setting: ScoreSetting) -> float:
    """The λ ``knnlm score`` tunes on the validation cache ``valid`` for this setting."""
    record = score(valid, None, dataclasses.replace(setting, split="valid", lam=TUNE))
    return float(record["metrics"]["lambda_used"])


class Inspector:
    """One retrieval of a cache, its knobs, and the texts needed to show its tokens."""

    def __init__(
        self,
        cache: Cache,
        setting: ScoreSetting,
        *,
        valid_cache: Cache | None = None,
        data: str | None = None,
        datastore: str | None = None,
        context_words: int = DEFAULT_CONTEXT_WORDS,
        query_words: list[str] | None = None,
    ) -> None:
        """``query_words``: the words of the cache's tokens where they are no split of a data-bin (a prompt)."""
        if context_words < 0:
            raise KnnlmError(f"--context must be at least 0; got {context_words}")
        self.cache = cache
        self.setting = setting
        self.retrieval: Retrieval = cache.find(*setting.retrieval_knobs)
        if setting.k > self.retrieval.info.k_max:
            raise KnnlmError(
                f"--k {setting.k} exceeds k_max={self.retrieval.info.k_max} of {self.retrieval.path}; lower --k "
                f"or retrieve more neighbours"
            )
        self.context_words = context_words
        self.notes: list[str] = []
        self.lam, self.lam_source = self._lambda(valid_cache)
        self.data = data
        self._texts: dict[tuple[str, str], SplitText] = {}
        self.query_words = query_words
        self.query_text = None if query_words is not None else self._try(self._query_text)
        self.symbols = self.query_text.symbols if self.query_text else self._try(self._symbols)
        self.store = self._try(lambda: self._open_datastore(datastore))
        self.store_text = self._try(self._store_text) if self.store is not None else None

    # ------------------------------------------------------------------ set-up

    def _lambda(self, valid_cache: Cache | None) -> tuple[float, str]:
        if self.setting.lam != TUNE:
            return float(self.setting.lam), "given"
        valid = valid_cache
        if valid is None and self.cache.split == "valid":
            valid = self.cache
        if valid is None:
            raise KnnlmError(
                f"λ is tuned on a validation cache and {self.cache.path} is split {self.cache.split!r}: pass "
                f"--valid-cache or a number as --lambda"
            )
        return tuned_lambda(valid, self.setting), f"tuned on {valid.split}"

    def _try(self, make: Any) -> Any:
        """``make()``, or None with its message kept as a note: scores and values need no text."""
        try:
            return make()
        except KnnlmError as err:
            self.notes.append(str(err))
            return None

    def _text(self, data: str, split: str, sha: str | None, what: str) -> SplitText:
        key = (str(Path(data).resolve()), split)
        if key not in self._texts:
            self._texts[key] = open_split_text(data, split, sha, what)
        return self._texts[key]

    def _dump_record(self) -> dict[str, Any]:
        if self.cache.meta.get("units"):
            raise KnnlmError(
                f"{self.cache.path} holds tokens of a Hugging Face tokenizer; words are shown for fairseq "
                f"data-bins only (token ids are shown instead)"
            )
        dump = self.cache.meta.get("dump") or {}
        if not (self.data or dump.get("data")):
            raise KnnlmError(f"{self.cache.path / 'meta.json'} records no data folder; pass --data DATA_BIN")
        return dump

    def _query_text(self) -> SplitText:
        dump = self._dump_record()
        text = self._text(
            self.data or dump["data"], self.cache.split, dump.get("data_sha256"), f"the cache {self.cache.path}"
        )
        self._check_dictionary(text.symbols)
        return text

    def _symbols(self) -> list[str]:
        symbols = list(load_dictionary(self.data or self._dump_record()["data"]).symbols)
        self._check_dictionary(symbols)
        return symbols

    def _check_dictionary(self, symbols: list[str]) -> None:
        expected = self.cache.dictionary_fingerprint
        if expected is not None and dictionary_fingerprint(symbols) != expected:
            raise KnnlmError(
                f"the dictionary of {self.data} is not the one of the cache {self.cache.path}; pass --data with "
                f"the data-bin it was dumped from"
            )

    def _open_datastore(self, path: str | None) -> Datastore:
        recorded = self.retrieval.info.datastore
        path = path or recorded.get("path")
        if not path or not Path(path).is_dir():
            raise KnnlmError(
                f"the datastore of {self.retrieval.path} ({path}) is not on disk; pass --datastore "
                f"to show the neighbours' contexts"
            )
        store = Datastore.open(path)
        fingerprint = recorded.get("fingerprint")
        if fingerprint and store.datastore_id != fingerprint:
            raise KnnlmError(
                f"{path} is not the datastore {self.retrieval.path} searched (id "
                f"{store.datastore_id[:12]}, recorded {str(fingerprint)[:12]}); pass --datastore"
            )
        return store

    def _store_text(self) -> SplitText:
        source = self.store.split_source()
        if source.units:
            raise KnnlmError(
                f"{self.store.path} holds Hugging Face tokenizer pieces; contexts are shown for fairseq data-bins only"
            )
        return self._text(
            self.data or source.data, source.split, source.data_sha256, f"the datastore {self.store.path}"
        )

    # ------------------------------------------------------------------ queries

    def word_text(self, token: int) -> str:
        if self.symbols is not None and 0 <= token < len(self.symbols):
            return self.symbols[token]
        return f"#{token}"

    def positions_of_word(self, word: str, occurrence: int | None) -> list[int]:
        """Cache positions whose target is ``word``: the ``occurrence``-th (1-based), or all of them (None)."""
        if self.symbols is None:
            raise KnnlmError(f"--word needs the dictionary of the cache: {self.notes[-1] if self.notes else ''}")
        if word not in self.symbols:
            raise KnnlmError(
                f"--word {word!r} is not in the dictionary ({len(self.symbols):,} words); check its spelling and case"
            )
        found = np.flatnonzero(np.asarray(self.cache.targets) == self.symbols.index(word))
        if found.size == 0:
            raise KnnlmError(f"--word {word!r} is never a target in {self.cache.path} ({self.cache.n_tokens:,} tokens)")
        if occurrence is None:
            return [int(p) for p in found]
        if not 1 <= occurrence <= found.size:
            raise KnnlmError(
                f"--occurrence {occurrence}: {word!r} is a target {found.size} time(s) in "
                f"{self.cache.path}; give 1..{found.size} or 'all'"
            )
        return [int(found[occurrence - 1])]

    def token(self, position: int, top: int) -> TokenView:
        """The view of cache token ``position`` with its ``top`` best kept neighbours."""
        n = self.cache.n_tokens
        if not 0 <= position < n:
            raise KnnlmError(f"--position {position} is outside the {n:,} tokens of {self.cache.path} (0..{n - 1})")
        if top < 1:
            raise KnnlmError(f"--top must be at least 1; got {top}")
        s, k, tau = self.setting, self.setting.k, self.setting.temperature
        rows = slice(position, position + 1)
        ids = np.asarray(self.retrieval.ids[rows, :k], dtype=np.int64)
        scores = np.asarray(self.retrieval.scores[rows, :k])
        vals = np.asarray(self.retrieval.vals[rows, :k], dtype=np.int64)
        target = int(self.cache.targets[position])
        targets = np.array([target])
        lm = float(self.cache.lm_logprob[position])
        knn = float(scoring.knn_logprob(scores, vals, targets, k, tau, ids=ids)[0])
        interp = float(scoring.interpolate(np.array([lm]), np.array([knn]), self.lam)[0])
        weights = scoring.neighbour_weights(scores, k, tau, ids=ids)[0]
        mass = scoring.knn_distribution(scores, vals, k, tau, self.cache.dict_size, ids=ids)[0]
        kept = (ids[0] >= 0) & np.isfinite(scores[0])
        notes = list(self.notes)
        context = self._query_context(position, target, notes)
        shown = np.flatnonzero(kept)[:top]
        contexts = self._neighbour_contexts(ids[0, shown], vals[0, shown], notes)
        neighbours = [
            Neighbour(
                int(c) + 1,
                int(ids[0, c]),
                float(scores[0, c]),
                float(weights[c]),
                int(vals[0, c]),
                self.word_text(int(vals[0, c])),
                int(vals[0, c]) == target,
                ctx,
            )
            for c, ctx in zip(shown, contexts, strict=True)
        ]
        values, counts = np.unique(vals[0, kept], return_counts=True)
        masses = sorted(
            (
                ValueMass(int(v), self.word_text(int(v)), float(mass[v]), int(c), int(v) == target)
                for v, c in zip(values, counts, strict=True)
            ),
            key=lambda m: (-m.mass, m.value),
        )
        return TokenView(
            cache=str(self.cache.path),
            split=self.cache.split,
            retrieval=self.retrieval.info.name,
            position=position,
            n_tokens=n,
            target=target,
            target_text=self.word_text(target),
            context=context,
            lm_logprob=lm,
            knn_logprob=knn,
            interp_logprob=interp,
            k=k,
            kept=int(kept.sum()),
            temperature=s.temperature,
            lam=self.lam,
            lam_source=self.lam_source,
            neighbours=neighbours,
            masses=masses,
            notes=notes,
        )

    def _query_context(self, position: int, target: int, notes: list[str]) -> list[str] | None:
        if self.query_words is not None:
            return self.query_words[max(0, position - self.context_words) : position]
        if self.query_text is None:
            return None
        if int(self.query_text.stream.targets(position, position + 1)[0]) != target:
            notes.append(
                f"token {position} of split {self.cache.split!r} of {self.query_text.data} is not the "
                f"cache's target there; its context is not shown"
            )
            return None
        return self.query_text.words(position - self.context_words, position)

    def _neighbour_contexts(self, ids: np.ndarray, vals: np.ndarray, notes: list[str]) -> list[list[str] | None]:
        if self.store_text is None or self.store is None:
            return [None] * len(ids)
        out: list[list[str] | None] = []
        for pos, val in zip(self.store.positions_of(ids), vals, strict=True):
            pos = int(pos)
            if int(self.store_text.stream.targets(pos, pos + 1)[0]) != int(val):
                notes.append(
                    f"{self.store.path}: the token at position {pos} is not the entry's value; its context is not shown"
                )
                out.append(None)
            else:
                out.append(self.store_text.words(pos - self.context_words, pos))
        return out
