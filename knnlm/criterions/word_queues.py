"""Per-word FIFO queues of context representations for the MoCo-queue criterion (Eq. 1).

For every word ``w`` of the vocabulary a ring buffer of ``L`` slots holds the last
``L`` representations of contexts whose next word was ``w``. Memory is
``V · L · D · bytes`` (fp32: 4 bytes, fp16/bf16: 2) plus 16 bytes per word of
counters; see :func:`queue_bytes`.

The slots are stored as an *integer* buffer holding the float bit patterns
(int32 for fp32, int16 for fp16/bf16) and viewed as floats on use: fairseq's
trainer calls ``criterion.half()`` under ``--fp16``, which casts every floating
buffer, and the storage dtype the user chose must survive that unchanged.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from knnlm.errors import KnnlmError

QueueDtype = Literal["fp32", "fp16", "bf16"]
QUEUE_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    # name: (value dtype, integer dtype of the same width used for storage)
    "fp32": (torch.float32, torch.int32),
    "fp16": (torch.float16, torch.int16),
    "bf16": (torch.bfloat16, torch.int16),
}


def queue_bytes(num_words: int, size: int, dim: int, dtype: str) -> int:
    """Bytes of the slots of ``num_words`` queues of ``size`` vectors of ``dim`` values."""
    if dtype not in QUEUE_DTYPES:
        raise KnnlmError(f"queue dtype {dtype!r} is not one of {', '.join(QUEUE_DTYPES)}")
    return num_words * size * dim * QUEUE_DTYPES[dtype][0].itemsize


class WordQueues(nn.Module):
    """``V`` ring buffers of ``L`` stop-gradient vectors of dimension ``D``.

    ``head[w]`` is the slot the next vector for ``w`` goes to (the oldest one once the
    queue is full) and ``count[w]`` the number of filled slots (``<= L``); slots fill
    in order ``0, 1, ...``, so slot ``i`` is filled iff ``i < count[w]``.
    """

    def __init__(
        self, num_words: int, size: int, dim: int, dtype: str = "fp32", device: torch.device | None = None
    ) -> None:
        super().__init__()
        if dtype not in QUEUE_DTYPES:
            raise KnnlmError(f"queue dtype {dtype!r} is not one of {', '.join(QUEUE_DTYPES)}")
        if size < 1:
            raise KnnlmError(f"the queue size must be >= 1, got {size}")
        self.num_words, self.size, self.dim, self.dtype_name = num_words, size, dim, dtype
        self.dtype, bits_dtype = QUEUE_DTYPES[dtype]
        # all-zero bits are +0.0 in every float format
        self.register_buffer("bits", torch.zeros(num_words, size, dim, dtype=bits_dtype, device=device))
        self.register_buffer("head", torch.zeros(num_words, dtype=torch.long, device=device))
        self.register_buffer("count", torch.zeros(num_words, dtype=torch.long, device=device))

    @property
    def values(self) -> Tensor:
        """The slots as floats, ``V x L x D`` (a view: writes go to the buffer)."""
        return self.bits.view(self.dtype)

    def get_extra_state(self) -> dict:
        return {"dtype": self.dtype_name, "size": self.size, "dim": self.dim, "num_words": self.num_words}

    def set_extra_state(self, state: dict) -> None:
        mine = self.get_extra_state()
        if state != mine:
            raise KnnlmError(
                f"the checkpoint's MoCo queues ({state}) differ from this run's ({mine}); resume with "
                f"the original --queue-size/--queue-dtype/--knn-key and model, or start a new --save-dir"
            )

    @torch.no_grad()
    def push(self, words: Tensor, vectors: Tensor) -> None:
        """Append ``vectors[j]`` to the queue of ``words[j]``, in order of ``j`` (FIFO per word).

        A word seen more than ``L`` times keeps its last ``L`` vectors, as if they had
        been pushed one by one.
        """
        if words.numel() == 0:
            return
        stored = vectors.detach().to(self.dtype)
        if self.dtype == torch.float16 and not torch.isfinite(stored).all():
            raise KnnlmError(
                "a representation exceeds the fp16 range of the MoCo queue; use --queue-dtype bf16 or fp32"
            )
        order = torch.argsort(words, stable=True)
        sorted_words = words[order]
        uniq, counts = torch.unique_consecutive(sorted_words, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        # rank of each occurrence among the occurrences of its word, in batch order
        rank = torch.arange(words.numel(), device=words.device) - torch.repeat_interleave(starts, counts)
        per_word = torch.repeat_interleave(counts, counts)
        keep = rank >= per_word - self.size  # earlier ones would be overwritten within this batch
        slot = (self.head[sorted_words] + rank) % self.size
        self.values[sorted_words[keep], slot[keep]] = stored[order[keep]]
        self.head[uniq] = (self.head[uniq] + counts) % self.size
        self.count[uniq] = torch.clamp(self.count[uniq] + counts, max=self.size)

    @torch.no_grad()
    def stats(self, words: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor, Tensor]:
        """For each ``words[j]``: filled slots ``n``, ``Σ_i q_i`` and ``Σ_i ||q_i||²``, summed in ``dtype``.

        Over filled slots only. Lets ``Σ_i ||q_i − r||² = n·||r||² − 2·r·Σq_i + Σ||q_i||²``
        be formed without an ``N x L x D`` tensor.
        """
        uniq, inverse = torch.unique(words, return_inverse=True)
        filled = self.count[uniq]
        sums = torch.zeros(uniq.numel(), self.dim, dtype=dtype, device=words.device)
        sq_sums = torch.zeros(uniq.numel(), dtype=dtype, device=words.device)
        for i in range(self.size):
            in_use = (filled > i)[:, None]
            q = torch.where(in_use, self.values[uniq, i].to(dtype), 0.0)
            sums += q
            sq_sums += q.pow(2).sum(-1)
        return filled[inverse].to(dtype), sums[inverse], sq_sums[inverse]

    def contents(self, word: int) -> Tensor:
        """The filled vectors of ``word``, oldest first (``count x D``, storage dtype)."""
        n = int(self.count[word])
        start = int(self.head[word]) if n == self.size else 0
        order = [(start + i) % self.size for i in range(n)]
        return self.values[word, order]
