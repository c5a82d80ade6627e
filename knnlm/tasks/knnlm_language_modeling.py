"""``--task knnlm_language_modeling``: kNN-LM evaluation in one pass of ``fairseq-eval-lm``.

For users of the original kNN-LM code (Khandelwal et al. 2020): the options map
one-to-one onto its flags, without ``--knnlm`` (choosing this task means it)::

    fairseq-eval-lm data-bin/wikitext-103 --user-dir knnlm --task knnlm_language_modeling \\
        --path checkpoint_best.pt --gen-subset valid --tokens-per-sample 3072 --context-window 1536 \\
        --dstore-filename datastores/wt103/att --indexfile indexes/wt103.att.l2.faiss \\
        --k 1024 --lmbda 0.25 --probe 32 --knn-keytype att --knn-sim-func do_not_recomp

The loaded LM is wrapped by :class:`KnnInterpolatedLM`, whose
``get_normalized_probs`` returns ``log((1−λ)·p_LM + λ·p_kNN)`` over the whole
vocabulary (Eq. 5 with τ = ``--knn-temp``), so fairseq's ``SequenceScorer`` and
its perplexity are used unchanged. The kNN distribution comes from
:func:`knnlm.scoring.knn_distribution`, the same function the two-phase path
(``knnlm eval`` + ``knnlm score``) scores with; a test checks the two agree.
With ``λ < 1`` no target has zero probability, so fairseq's eval never drops a
token as ``±inf``; ``--lmbda 1`` is refused for that reason (use the two-phase
path, which counts zero-mass tokens).
"""

# no `from __future__ import annotations`: fairseq reads dataclass field types at runtime

import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from fairseq.dataclass import ChoiceEnum
from fairseq.models import BaseFairseqModel
from fairseq.tasks import register_task
from fairseq.tasks.language_modeling import LanguageModelingConfig, LanguageModelingTask

from knnlm.datastore import Datastore, KnnIndex, exact_topk, rescore
from knnlm.errors import KnnlmError
from knnlm.models.capture import KEY_TYPES, KeyCapture
from knnlm.scoring import knn_distribution


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


class KnnRetriever:
    """Neighbour search for query vectors: FAISS (optionally rescored) or exact."""

    def __init__(self, cfg: KnnLanguageModelingConfig) -> None:
        if not cfg.dstore_filename:
            raise KnnlmError("--task knnlm_language_modeling needs --dstore-filename DATASTORE_FOLDER")
        self.store = Datastore.open(cfg.dstore_filename, key_type=str(cfg.knn_keytype))
        if cfg.dstore_size is not None and cfg.dstore_size != self.store.num_keys:
            raise KnnlmError(
                f"--dstore-size {cfg.dstore_size} but {cfg.dstore_filename} holds {self.store.num_keys} keys; "
                "drop --dstore-size (it is read from the datastore) or point at the right datastore"
            )
        self.index = KnnIndex.load(cfg.indexfile, self.store, nprobe=cfg.probe) if cfg.indexfile else None
        if self.index is not None:
            self.similarity = self.index.similarity
            if cfg.knn_similarity is not None and str(cfg.knn_similarity) != self.similarity:
                raise KnnlmError(f"--knn-similarity {cfg.knn_similarity} differs from the metric of {cfg.indexfile}")
        elif cfg.knn_similarity is None:
            raise KnnlmError("exact search (no --indexfile) needs --knn-similarity l2|ip")
        else:
            self.similarity = str(cfg.knn_similarity)
        self.k = min(cfg.k, self.store.num_keys)
        self.recompute = cfg.knn_sim_func == "recomp"
        self.device = cfg.knn_device

    def search(self, queries: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(scores [Q, k], vals [Q, k])``; missing neighbours have score −inf."""
        if self.index is None:
            scores, ids = exact_topk(queries, self.store, self.k, self.similarity, device=self.device)
        else:
            scores, ids = self.index.search(queries, self.k)
            if self.recompute:
                scores = rescore(queries, ids, self.store, self.similarity, device=self.device)
        return scores, self.store.values_of(ids)


class KnnInterpolatedLM(BaseFairseqModel):
    """A fairseq LM whose normalized probabilities are the kNN-LM interpolation.

    Parameters and state dict are the wrapped LM's (checkpoints load unchanged).
    """

    def __init__(self, lm: BaseFairseqModel, retriever: KnnRetriever, cfg: KnnLanguageModelingConfig) -> None:
        super().__init__()
        if not 0.0 <= cfg.lmbda < 1.0:
            raise KnnlmError(f"--lmbda must be in [0, 1) for fairseq-eval-lm; got {cfg.lmbda}")
        if cfg.knn_temp <= 0:
            raise KnnlmError(f"--knn-temp must be positive; got {cfg.knn_temp}")
        self.lm = lm
        self.retriever = retriever
        self.lmbda = float(cfg.lmbda)
        self.temperature = float(cfg.knn_temp)
        self.key_type = str(cfg.knn_keytype)
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

    def state_dict(self, *args, **kwargs):
        return self.lm.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict=True, model_cfg=None, args=None):
        return self.lm.load_state_dict(state_dict, strict=strict, model_cfg=model_cfg)

    def get_normalized_probs(self, net_output, log_probs, sample=None):
        lm_lprobs = self.lm.get_normalized_probs(net_output, log_probs=True, sample=sample).float()
        queries = net_output[1]["knn_queries"]
        if queries.shape[:2] != lm_lprobs.shape[:2]:
            raise KnnlmError(
                "the kNN queries do not line up with the scored positions: leave fairseq-eval-lm's "
                "--softmax-batch at its default"
            )
        batch, length, vocab = lm_lprobs.shape
        flat = queries.reshape(batch * length, -1).float().cpu().numpy()
        scores, vals = self.retriever.search(flat)
        knn_p = knn_distribution(scores, vals, self.retriever.k, self.temperature, vocab)
        with np.errstate(divide="ignore"):  # words no neighbour carries: log 0 = -inf, by design
            knn_log = np.log(knn_p)
        knn_lprobs = torch.from_numpy(knn_log).to(lm_lprobs).view(batch, length, vocab)
        mixed = torch.logaddexp(
            lm_lprobs + math.log1p(-self.lmbda),
            knn_lprobs + (math.log(self.lmbda) if self.lmbda > 0 else -math.inf),
        )
        return mixed if log_probs else mixed.exp()


@register_task("knnlm_language_modeling", dataclass=KnnLanguageModelingConfig)
class KnnLanguageModelingTask(LanguageModelingTask):
    """fairseq's language modeling task whose models interpolate with a kNN datastore."""

    def build_model(self, cfg, from_checkpoint=False):
        lm = super().build_model(cfg, from_checkpoint)
        options = self.args  # LanguageModelingTask is a legacy task: its options live in .args
        return KnnInterpolatedLM(lm, KnnRetriever(options), options)
