"""Hugging Face causal LMs (GPT-2, Llama-style, GPT-NeoX, ...) as base models: ``--hf-model NAME_OR_PATH``.

The keys are the ones the fairseq path captures, read with forward hooks on the
loaded model, never a patched forward:

``att``
    the input of the last block's MLP, i.e. the output of the LayerNorm/RMSNorm in
    front of it (GPT-2 ``ln_2``, Llama ``post_attention_layernorm``);
``ffn``
    the output of the final norm (GPT-2 ``ln_f``, Llama ``norm``): the hidden state
    the LM head receives.

Log-probabilities come from the model's own forward (its logits, log-softmaxed in
fp32), so they are what its loss is made of. Needs the ``hf`` extra
(``pip install -e .[hf]``). With ``HF_HUB_OFFLINE=1`` (or ``TRANSFORMERS_OFFLINE=1``)
only the local cache is read and a model not in it is refused with a message.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from knnlm.errors import KnnlmError
from knnlm.io import dictionary_fingerprint, fingerprint, sha256_files
from knnlm.models.base_lm import SplitTokens
from knnlm.models.capture import HookedKeys
from knnlm.models.hf_text import find_split_file, read_lines, tokenize_lines
from knnlm.models.windows import TokenStream

logger = logging.getLogger(__name__)

# (decoder layers, final norm) of the causal LM families whose last layer has an ``mlp``
LAYOUTS: tuple[tuple[str, str], ...] = (
    ("transformer.h", "transformer.ln_f"),  # GPT-2, DistilGPT-2, GPT-Neo, GPT-J
    ("model.layers", "model.norm"),  # Llama, Mistral, Qwen2, Gemma, Phi-3
    ("gpt_neox.layers", "gpt_neox.final_layer_norm"),  # GPT-NeoX, Pythia
)
# longest default window: GPT-2's context, the usual WikiText-103 evaluation length
DEFAULT_MAX_WINDOW = 1024
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt")
_TRUE = ("1", "on", "yes", "true")


def import_transformers() -> Any:
    """``transformers``, or a :class:`KnnlmError` saying how to install it."""
    try:
        import transformers
    except ImportError as err:
        raise KnnlmError(f"--hf-model needs transformers ({err}); install it with: pip install -e .[hf]") from None
    _hide_broken_torchaudio(transformers)
    return transformers


def _hide_broken_torchaudio(transformers: Any) -> None:
    """fairseq pulls in torchaudio, whose wheel may not load with the installed torch; transformers
    imports it whenever it is installed, which fails every model import. Tell transformers it is absent."""
    if importlib.util.find_spec("torchaudio") is None:
        return
    try:
        import torchaudio  # noqa: F401
    except (OSError, ImportError, RuntimeError) as err:
        logger.debug("torchaudio does not load (%s); transformers will not use it", err)
        for module in (transformers.utils, transformers.utils.import_utils):
            module.is_torchaudio_available = lambda: False


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off by the environment."""
    return any(os.environ.get(v, "").strip().lower() in _TRUE for v in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _dtype_kwargs(transformers: Any, dtype: torch.dtype) -> dict[str, Any]:
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def load_pretrained(name: str, revision: str | None = None) -> tuple[nn.Module, Any]:
    """Model (fp32) and tokenizer of a hub name or a ``save_pretrained`` folder."""
    transformers = import_transformers()
    if name.startswith((".", "/", "~")) and not Path(name).expanduser().is_dir():
        raise KnnlmError(f"--hf-model {name}: no such folder; pass a hub name (e.g. gpt2) or a save_pretrained folder")
    offline = hub_offline()
    kwargs: dict[str, Any] = {"revision": revision, "local_files_only": offline}
    try:
        path = str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name
        tokenizer = transformers.AutoTokenizer.from_pretrained(path, **kwargs)
        model = transformers.AutoModelForCausalLM.from_pretrained(
            path, **kwargs, **_dtype_kwargs(transformers, torch.float32)
        )
    except (OSError, ValueError) as err:
        if offline:
            raise KnnlmError(
                f"--hf-model {name}: not in the local Hugging Face cache, and the hub is switched off "
                f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE). Run once with network access to download it, or pass "
                f"a local folder written by save_pretrained ({err})"
            ) from None
        raise KnnlmError(
            f"--hf-model {name}: could not load it ({err}); check the name or path and the network, or set "
            f"HF_HUB_OFFLINE=1 to use the local cache only"
        ) from None
    return model, tokenizer


def check_available(name: str) -> str:
    """Where ``--hf-model name`` will come from (``folder``, ``cache`` or ``hub``); refuse it if from nowhere.

    Run before long jobs, so that an offline machine stops at once instead of after the first model.
    """
    if Path(name).expanduser().is_dir():
        return "folder"
    import_transformers()
    import huggingface_hub

    try:
        huggingface_hub.snapshot_download(repo_id=name, local_files_only=True)
        return "cache"
    except (OSError, ValueError):
        pass
    if hub_offline():
        raise KnnlmError(
            f"--hf-model {name}: not in the local Hugging Face cache, and the hub is switched off "
            f"(HF_HUB_OFFLINE/TRANSFORMERS_OFFLINE). Run once with network access to download it"
        )
    try:
        huggingface_hub.model_info(name, timeout=20)
    except Exception as err:  # any failure to reach the hub or find the model means: cannot download
        raise KnnlmError(
            f"--hf-model {name}: not in the local Hugging Face cache and not downloadable ({type(err).__name__}: "
            f"{err}); check the name and the network, or copy the model into the cache"
        ) from None
    return "hub"


def find_layout(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """The last decoder layer's MLP and the final norm of a causal LM."""
    for layers_name, norm_name in LAYOUTS:
        try:
            layers, norm = model.get_submodule(layers_name), model.get_submodule(norm_name)
        except AttributeError:
            continue
        if len(layers) and hasattr(layers[-1], "mlp"):
            return layers[-1].mlp, norm
    families = "; ".join(f"{a} + {b}" for a, b in LAYOUTS)
    raise KnnlmError(
        f"{type(model).__name__}: cannot find the last layer's MLP and the final norm (known layouts: "
        f"{families}); add the model's module names to knnlm.models.hf.LAYOUTS"
    )


class HFKeyCapture(HookedKeys):
    """Records ``att`` (MLP input of the last layer) and ``ffn`` (final norm output), batch-first."""

    def __init__(self, model: nn.Module) -> None:
        mlp, norm = find_layout(model)
        super().__init__()
        self._handles = [
            mlp.register_forward_pre_hook(self._save_att, with_kwargs=True),
            norm.register_forward_hook(self._save_ffn),
        ]

    def _save_att(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._store["att"] = args[0] if args else next(v for v in kwargs.values() if isinstance(v, Tensor))

    def _save_ffn(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._store["ffn"] = output[0] if isinstance(output, tuple) else output


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's pieces in id order (what each id means)."""
    return dictionary_fingerprint(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer)))))


class HFCausalLM:
    """A transformers causal LM and its tokenizer as a :class:`~knnlm.models.base_lm.BaseLM`."""

    def __init__(self, model: nn.Module, tokenizer: Any, name: str, revision: str | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.name = name
        self.revision = revision
        config = model.config
        positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
        self.max_positions = int(positions) if positions else None
        self.default_tokens_per_sample = min(self.max_positions or DEFAULT_MAX_WINDOW, DEFAULT_MAX_WINDOW)
        self.vocab_size = int(model.get_output_embeddings().out_features)
        prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if prefix is None:
            raise KnnlmError(f"--hf-model {name}: the tokenizer has neither a BOS nor an EOS token to start a split")
        self.prefix = int(prefix)
        pad = tokenizer.pad_token_id
        self.pad = int(pad if pad is not None else self.prefix)
        self._base_model: dict[str, Any] | None = None
        find_layout(model)  # refuse an unknown layout now, not after tokenizing a split

    @classmethod
    def load(cls, name: str, revision: str | None = None) -> HFCausalLM:
        model, tokenizer = load_pretrained(name, revision)
        return cls(model, tokenizer, name, revision)

    def describe(self) -> str:
        return f"--hf-model {self.name}"

    def base_model(self) -> dict[str, Any]:
        """What identifies the weights: the hub commit, or a hash of a local folder's files."""
        if self._base_model is None:
            commit = getattr(self.model.config, "_commit_hash", None)
            folder = Path(self.name).expanduser()
            weights = None
            if folder.is_dir():
                files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in _WEIGHT_SUFFIXES)
                weights = sha256_files(files)
            self._base_model = {
                "kind": "hf",
                "architecture": type(self.model).__name__,
                "revision": commit or self.revision,
                "files_sha256": weights,
                "tokenizer_sha256": tokenizer_fingerprint(self.tokenizer),
            }
        return self._base_model

    def source(self) -> dict[str, Any]:
        base = self.base_model()
        return {
            "checkpoint_sha256": fingerprint(base),
            "dictionary_sha256": base["tokenizer_sha256"],
            "dictionary_size": self.vocab_size,
            "base_model": base,
        }

    def paths(self) -> dict[str, str]:
        folder = Path(self.name).expanduser()
        return {"hf_model": str(folder.resolve()) if folder.is_dir() else self.name}

    def key_dim(self, key_type: str) -> int:
        return int(self.model.config.hidden_size)

    def load_split(self, data: str | os.PathLike, split: str, words: bool = False) -> SplitTokens:
        path = find_split_file(data, split)
        chunks, word_ids = tokenize_lines(self.tokenizer, read_lines(path), words)
        sizes = np.asarray([len(c) for c in chunks], dtype=np.int64)
        prefix_piece = self.tokenizer.convert_ids_to_tokens(self.prefix)
        units = {
            "token": f"{type(self.tokenizer).__name__} piece of {self.name} (each line tokenized on its own, "
            "no special tokens)",
            "first_target_context": f"{prefix_piece} (id {self.prefix})",
        }
        if words:
            units["word"] = "whitespace-separated word of the text, plus one end-of-line per line"
            units["word_ppl"] = "exp(total NLL over all tokens / words)"
        return SplitTokens(TokenStream(chunks, sizes, self.prefix), sha256_files([path]), word_ids, units)

    def prepare(self, device: torch.device, fp16: bool) -> None:
        self.model.eval()
        self.model.to(device)
        if fp16:
            self.model.half()

    def capture(self) -> HFKeyCapture:
        return HFKeyCapture(self.model)

    def features(self, tokens: Tensor) -> None:
        self.model.base_model(input_ids=tokens, use_cache=False)

    def target_logprobs(self, tokens: Tensor, rows: Tensor, cols: Tensor, targets: Tensor) -> Tensor:
        logits = self.model(input_ids=tokens, use_cache=False).logits[rows, cols].float()
        return logits.gather(1, targets[:, None])[:, 0] - torch.logsumexp(logits, dim=-1)
