"""Open the base LM a command line names: a fairseq ``--checkpoint`` or a Hugging Face ``--hf-model``."""

from __future__ import annotations

from knnlm.errors import KnnlmError
from knnlm.models.base_lm import BaseLM

# the help of the options that name a base model, shared by every config that has them
BASE_MODEL_HELP = {
    "checkpoint": "fairseq LM checkpoint (.pt)",
    "hf_model": "instead of --checkpoint: a Hugging Face causal LM (hub name or save_pretrained folder; "
    "pip install -e .[hf]); tokens are its tokenizer's",
    "hf_revision": "hub revision (branch, tag or commit) of --hf-model",
    "data": "fairseq data-bin folder (dict.txt, SPLIT.bin/.idx); with --hf-model a folder of raw text "
    "(wiki.SPLIT.raw, wiki.SPLIT.tokens or SPLIT.txt)",
}


def open_base_lm(checkpoint: str | None, hf_model: str | None, data: str, hf_revision: str | None = None) -> BaseLM:
    """The model of ``--checkpoint`` (fairseq, with the data-bin's dictionary) or ``--hf-model``."""
    if checkpoint and hf_model:
        raise KnnlmError(
            f"--checkpoint {checkpoint} and --hf-model {hf_model} both name a base model; pass only one "
            "(--checkpoint for a fairseq checkpoint, --hf-model for a Hugging Face causal LM)"
        )
    if hf_model:
        from knnlm.models.hf import HFCausalLM

        return HFCausalLM.load(hf_model, revision=hf_revision)
    if hf_revision:
        raise KnnlmError("--hf-revision needs --hf-model; a fairseq --checkpoint has no revision")
    if not checkpoint:
        raise KnnlmError("no base model: pass --checkpoint CKPT.pt (fairseq) or --hf-model NAME_OR_PATH (transformers)")
    from knnlm.models.fairseq_lm import FairseqLM

    return FairseqLM.load(checkpoint, data)
