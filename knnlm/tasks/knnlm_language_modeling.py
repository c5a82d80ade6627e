"""``--task knnlm_language_modeling``: kNN-LM evaluation in one pass of ``fairseq-eval-lm``.

For users of the original kNN-LM code (Khandelwal et al. 2020): the options map
one-to-one onto its flags, without ``--knnlm`` (choosing this task means it)::

    fairseq-eval-lm data-bin/wikitext-103 --user-dir knnlm --task knnlm_language_modeling \\
        --path checkpoint_best.pt --gen-subset valid --tokens-per-sample 3072 --context-window 1536 \\
        --dstore-filename datastores/wt103/att --indexfile indexes/wt103.att.l2.faiss \\
        --k 1024 --lmbda 0.25 --probe 32 --knn-keytype att --knn-sim-func do_not_recomp

The loaded LM is wrapped by :class:`KnnInterpolatedLM`, whose
``get_normalized_probs`` returns ``log((1−λ)·p_LM + λ·p_kNN)`` (Eq. 5 with
τ = ``--knn-temp``), so fairseq's ``SequenceScorer`` and its perplexity are used
unchanged. When the scorer passes the targets (as ``fairseq-eval-lm`` does), only
the positions it scores are searched — not the carried context, whose targets are
padding — and only the targets' probabilities are computed, in torch on the
model's device (:mod:`knnlm.scoring_torch`); the result is handed back as a
[B, T, V] view that repeats each position's value along V, which is all the
scorer's ``gather`` reads. Without targets (or with ``--knn-full-distribution``)
the whole interpolated distribution is built. Searching goes through
:class:`knnlm.datastore.retriever.Retriever`, as in ``knnlm eval retrieve``; a test
checks that both paths give the same perplexity.
With ``λ < 1`` no target has zero probability, so fairseq's eval never drops a
token as ``±inf``; ``--lmbda 1`` is refused for that reason (use the two-phase
path, which counts zero-mass tokens).

``knnlm generate`` (:mod:`knnlm.generation.fairseq_lm`) decodes with the same wrapper
through fairseq's ``SequenceGenerator``, which calls the decoder itself with an
incremental state; the queries then come from the capture's last position.
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

from dataclasses import dataclass, field
from typing import Optional

import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from knnlm.datastore.retriever import Retriever
from knnlm.datastore.store import Datastore
from knnlm.errors import KnnlmError
from knnlm.io import dictionary_fingerprint
from knnlm.models.capture import KEY_TYPES, KeyCapture
from knnlm.models.fairseq_lm import output_logprobs
from knnlm.scoring_torch import interpolate, knn_log_distribution, knn_target_logprob


@dataclass
class KnnLanguageModelingConfig(LanguageModelingConfig):
    dstore_filename: str = field(default="", metadata={"help": "datastore folder (knnlm datastore build)"})
    dstore_size: Optional[int] = field(
        default=None, metadata={"help": "expected number of keys; checked against the datastore if given"}
    )
    indexfile: str = field(default="", metadata={"help": "FAISS index file; empty: exact search over the keys"})
    k: int = field(default=1024, metadata={"help": "neighbours retrieved per token"})
    lmbda: float = field(default=0.25, metadata={"help": "interpolation weight λ of the kNN distribution"})
    probe: Optional[int] = field(default=None, metadata={"help": "nprobe (default: the index's stored one)"})
    knn_keytype: ChoiceEnum(list(KEY_TYPES)) = field(
        default="att", metadata={"help": "att: input of the last FFN (original 'last_ffn_input'); ffn: final state"}
    )
    knn_sim_func: ChoiceEnum(["do_not_recomp", "recomp"]) = field(
        default="do_not_recomp",
        metadata={"help": "do_not_recomp: FAISS scores; recomp: exact scores recomputed from the stored keys"},
    )
    knn_similarity: Optional[ChoiceEnum(["l2", "ip"])] = field(
        default=None, metadata={"help": "l2 or ip; taken from the index (required with exact search)"}
    )
    knn_temp: float = field(default=1.0, metadata={"help": "softmax temperature τ of the kNN distribution"})
    knn_device: str = field(default="auto", metadata={"help": "device of exact search/rescoring"})
    knn_mmap: bool = field(
        default=False, metadata={"help": "leave the index's inverted lists on disk (indexes larger than RAM)"}
    )
    knn_full_distribution: bool = field(
        default=False,
        metadata={"help": "build the whole interpolated distribution over the vocabulary even when fairseq "
                  "only reads the targets' probabilities (slower; for code that inspects it)"},
    )


def open_retriever(cfg: KnnLanguageModelingConfig, dictionary) -> tuple[Retriever, int]:
    """The task's retriever and k, from the original kNN-LM flags; the datastore must share the dictionary."""
    if not cfg.dstore_filename:
        raise KnnlmError("--task knnlm_language_modeling needs --dstore-filename DATASTORE_FOLDER")
    store = Datastore.open(cfg.dstore_filename, key_type=str(cfg.knn_keytype),
                           dictionary_sha256=dictionary_fingerprint(dictionary))
    retriever = Retriever.open(
        store,
        cfg.indexfile or None,
        similarity=None if cfg.knn_similarity is None else str(cfg.knn_similarity),
        real_score=cfg.knn_sim_func == "recomp" and bool(cfg.indexfile),
        nprobe=cfg.probe,
        device=cfg.knn_device,
        mmap=bool(cfg.knn_mmap),
    )
    if cfg.dstore_size is not None and cfg.dstore_size != retriever.num_keys:
        raise KnnlmError(
            f"--dstore-size {cfg.dstore_size} but {cfg.dstore_filename} holds {retriever.num_keys} keys; "
            "drop --dstore-size (it is read from the datastore) or point at the right datastore"
        )
    return retriever, min(cfg.k, retriever.num_keys)


class KnnInterpolatedLM(BaseFairseqModel):
    """A fairseq LM whose normalized probabilities are the kNN-LM interpolation.

    Parameters and state dict are the wrapped LM's (checkpoints load unchanged).
    """

    def __init__(
        self,
        lm: BaseFairseqModel,
        retriever: Retriever,
        k: int,
        *,
        lmbda: float,
        temperature: float = 1.0,
        key_type: str = "att",
        full_distribution: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= lmbda <= 1.0:
            raise KnnlmError(f"--lmbda must be in [0, 1]; got {lmbda}")
        if temperature <= 0:
            raise KnnlmError(f"--knn-temp must be positive; got {temperature}")
        self.lm = lm
        self.retriever = retriever
        self.k = k
        self.full_distribution = bool(full_distribution)
        self.lmbda = float(lmbda)
        self.temperature = float(temperature)
        self.key_type = str(key_type)
        self.capture = KeyCapture(lm.decoder)

    @property
    def decoder(self):
        return self.lm.decoder

    def forward(self, src_tokens, **kwargs):
        self.capture.clear()
        output, extra = self.lm(src_tokens, **kwargs)
        extra = dict(extra)
        extra["knn_queries"] = self.capture.pop(self.key_type)
        self.capture.clear()
        return output, extra

    def max_positions(self):
        return self.lm.max_positions()

    def max_decoder_positions(self):
        return self.lm.max_decoder_positions()

    def state_dict(self, *args, **kwargs):
        return self.lm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.lm.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg)

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        features = net_output[0]
        queries = self._queries(net_output)
        if queries.shape[:2] != features.shape[:2]:
            raise KnnlmError(
                "the kNN queries do not line up with the scored positions: leave fairseq-eval-lm's "
                "--softmax-batch at its default"
            )
        if self.lmbda == 0.0:  # Eq. 5 is the LM alone: no search (the queries were popped all the same)
            return self.lm.get_normalized_probs(net_output, log_probs=log_probs, sample=sample)
        target = None if sample is None else sample.get("target")
        if self.full_distribution or target is None or target.shape != features.shape[:2]:
            mixed = self._full_distribution(net_output, sample, queries)
        else:
            mixed = self._target_only(features, queries, target)
        return mixed if log_probs else mixed.exp()

    def _queries(self, net_output) -> torch.Tensor:
        """The kNN queries [B, T, D] of the positions in ``net_output``.

        :meth:`forward` hands them over in the output. fairseq's ``SequenceGenerator`` calls the
        decoder directly (through ``EnsembleModel``, with an incremental state) and keeps only the
        last position of its output, so then the queries are the capture's last positions.
        """
        extra = net_output[1] if len(net_output) > 1 and net_output[1] is not None else {}
        if "knn_queries" in extra:
            return extra["knn_queries"]
        features = net_output[0]
        try:
            queries = self.capture.pop(self.key_type)
        finally:
            self.capture.clear()
        if queries.shape[0] != features.shape[0]:
            raise KnnlmError(
                f"the captured {self.key_type} keys have {queries.shape[0]} rows but the decoder output has "
                f"{features.shape[0]}: get_normalized_probs must follow the decoder forward of the same batch"
            )
        return queries[:, queries.shape[1] - features.shape[1] :]

    def _search(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Neighbour scores and values of ``queries`` [N, D], as tensors on the queries' device."""
        scores, ids = self.retriever.search(queries.float().cpu().numpy(), self.k)
        vals = self.retriever.values_of(ids)
        return torch.from_numpy(scores).to(queries.device), torch.from_numpy(vals).to(queries.device)

    def _target_only(self, features: torch.Tensor, queries: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target) at the scored positions (target ≠ pad), as a [B, T, V] view repeating it along V."""
        scored = target.ne(self.lm.decoder.dictionary.pad())
        out = torch.zeros(target.shape, dtype=torch.float32, device=features.device)
        if scored.any():
            wanted = target[scored]
            lm = output_logprobs(self.lm.decoder, features[scored], wanted)
            scores, vals = self._search(queries[scored])
            knn = knn_target_logprob(scores, vals, wanted, self.k, self.temperature)
            out[scored] = interpolate(lm.double(), knn, self.lmbda).float()
        return out.unsqueeze(-1).expand(*target.shape, len(self.lm.decoder.dictionary))

    def _full_distribution(self, net_output, sample, queries: torch.Tensor) -> torch.Tensor:
        """The whole interpolated distribution, [B, T, V] (every position searched)."""
        lm_lprobs = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample).float()
        batch, length, vocab = lm_lprobs.shape
        scores, vals = self._search(queries.reshape(batch * length, -1))
        knn = knn_log_distribution(scores, vals, vocab, self.k, self.temperature)
        mixed = interpolate(lm_lprobs.reshape(batch * length, vocab).double(), knn, self.lmbda)
        return mixed.float().view(batch, length, vocab)


@register_task("knnlm_language_modeling", dataclass=KnnLanguageModelingConfig)
class KnnLanguageModelingTask(LanguageModelingTask):
    """fairseq's language modeling task whose models interpolate with a kNN datastore."""

    def build_model(self, cfg, from_checkpoint=False):
        lm = super().build_model(cfg, from_checkpoint)
        options = self.args  # LanguageModelingTask is a legacy task: its options live in .args
        if not 0.0 <= options.lmbda < 1.0:
            raise KnnlmError(f"--lmbda must be in [0, 1) for fairseq-eval-lm; got {options.lmbda}")
        retriever, k = open_retriever(options, self.source_dictionary)
        return KnnInterpolatedLM(
            lm,
            retriever,
            k,
            lmbda=options.lmbda,
            temperature=options.knn_temp,
            key_type=str(options.knn_keytype),
            full_distribution=bool(options.knn_full_distribution),
        )
