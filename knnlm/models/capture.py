"""Capture the kNN keys of a fairseq transformer decoder with forward hooks.

Two representations of the *last* decoder layer are used as kNN keys:

``att``
    The input of the layer's feed-forward block: the input of ``fc1``. In a
    pre-norm layer this is the output of ``final_layer_norm``; in a post-norm
    layer it is the output of ``self_attn_layer_norm`` (attention + residual,
    normalized). Khandelwal et al. (2020) call it "the input to the final FFN".
``ffn``
    The final hidden state that the output layer (softmax or adaptive softmax)
    receives: the output of ``project_out_dim`` if the decoder has one, else of
    the decoder's final ``layer_norm`` if it has one, else of the last layer.

Hooks are used instead of a patched forward so that the same code reads keys
out of stock fairseq ``transformer_lm`` checkpoints (e.g. the released kNN-LM
WIKI-103 model) without retraining. Tensors keep their autograd graph so that
training criteria can regularize them.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

KeyType = Literal["att", "ffn"]
KEY_TYPES: tuple[KeyType, ...] = ("att", "ffn")


class HookedKeys:
    """What every key capture shares: the hooks' handles and the last forward's ``att``/``ffn`` tensors.

    Subclasses register forward hooks that fill ``self._store`` (batch-first tensors).
    """

    def __init__(self) -> None:
        self._store: dict[str, Tensor] = {}
        self._handles: list = []

    def pop(self, key_type: KeyType) -> Tensor:
        """Return the representation captured by the last forward and forget it."""
        if key_type not in KEY_TYPES:
            raise ValueError(f"unknown key type {key_type!r}; choose one of {KEY_TYPES}")
        if key_type not in self._store:
            raise RuntimeError(f"no {key_type!r} representation captured: run a forward first")
        return self._store.pop(key_type)

    def pop_all(self) -> dict[str, Tensor]:
        """Return ``{"att": ..., "ffn": ...}`` from the last forward and forget them."""
        return {key: self.pop(key) for key in KEY_TYPES}

    def clear(self) -> None:
        self._store.clear()

    def remove(self) -> None:
        """Detach the hooks from the model."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._store.clear()

    def __enter__(self) -> HookedKeys:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class KeyCapture(HookedKeys):
    """Records ``att`` and ``ffn`` (batch-first, ``B x T x C``) on every decoder forward.

    Usage::

        capture = KeyCapture(model.decoder)
        model(tokens)
        att, ffn = capture.pop("att"), capture.pop("ffn")

    Hooks are bound methods of this object, so ``copy.deepcopy`` of a model that
    holds its capture (e.g. a momentum encoder) yields an independent capture.
    """

    def __init__(self, decoder: nn.Module) -> None:
        layers = getattr(decoder, "layers", None)
        if layers is None or len(layers) == 0 or not hasattr(layers[-1], "fc1"):
            raise TypeError(
                f"KeyCapture needs a fairseq TransformerDecoder with layers that have "
                f"an fc1 module; got {type(decoder).__name__}"
            )
        super().__init__()
        last = layers[-1]
        self._handles = [last.fc1.register_forward_pre_hook(self._save_att)]
        if getattr(decoder, "project_out_dim", None) is not None:
            self._handles.append(decoder.project_out_dim.register_forward_hook(self._save_ffn_batch_first))
        elif getattr(decoder, "layer_norm", None) is not None:
            self._handles.append(decoder.layer_norm.register_forward_hook(self._save_ffn_time_first))
        else:
            self._handles.append(last.register_forward_hook(self._save_ffn_layer_output))

    # fairseq decoder layers run time-first (T x B x C); keys are stored batch-first.
    def _save_att(self, module: nn.Module, inputs: tuple[Tensor, ...]) -> None:
        self._store["att"] = inputs[0].transpose(0, 1)

    def _save_ffn_batch_first(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._store["ffn"] = output

    def _save_ffn_time_first(self, module: nn.Module, inputs: tuple, output: Tensor) -> None:
        self._store["ffn"] = output.transpose(0, 1)

    def _save_ffn_layer_output(self, module: nn.Module, inputs: tuple, output: tuple) -> None:
        self._store["ffn"] = output[0].transpose(0, 1)


def key_dim(decoder: nn.Module, key_type: KeyType) -> int:
    """Dimension of the ``att`` or ``ffn`` key of a fairseq transformer decoder."""
    if key_type == "att":
        return decoder.layers[-1].fc1.in_features
    if getattr(decoder, "project_out_dim", None) is not None:
        return decoder.project_out_dim.out_features
    return decoder.layers[-1].fc2.out_features


@torch.no_grad()
def capture_keys(model: nn.Module, tokens: Tensor) -> dict[str, Tensor]:
    """One no-grad forward of a fairseq LM; returns its ``att`` and ffn`` keys."""
    with KeyCapture(model.decoder) as capture:
        model(tokens)
        return capture.pop_all()
