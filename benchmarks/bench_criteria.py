"""Training throughput of ``activation_l2`` and ``moco_queue`` relative to plain cross-entropy.

    .venv/bin/python benchmarks/bench_criteria.py [--arch small] [--vocab 33278] [--tokens-per-batch 2048]
        [--seq-len 256] [--steps 5] [--reps 5] [--threads 1] [--device cpu] [--out benchmarks/results/criteria]

One process trains one copy of the same freshly initialized model per criterion
(Adam, the same random Zipfian batches) and times them in interleaved blocks:
every repetition runs ``--steps`` updates of each criterion, in a rotated order,
so that all of them see the same machine load. A step is what fairseq's trainer
does: ``model.set_num_updates``, zero grads, criterion forward, backward, optimizer
step. The baseline is fairseq's own criterion for the model's softmax
(``cross_entropy``, or ``adaptive_loss`` for an adaptive softmax); ratios are medians
over repetitions of (criterion tokens/s) / (baseline tokens/s) of the same
repetition, for wall-clock time and, on CPU, this process's CPU time (steadier
when other jobs share the cores). The results file also holds the MoCo queue
memory at WIKI-103 scale (V = 267,744 words, D = 1024) and the size of an fp32
momentum encoder of the WIKI-103 model. Results: ``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from fairseq.criterions.adaptive_loss import AdaptiveLoss
from fairseq.criterions.cross_entropy import CrossEntropyCriterion
from fairseq.data import Dictionary

from knnlm.criterions import ActivationL2Criterion, MocoQueueCriterion, queue_bytes
from knnlm.models.transformer_lm import (
    KnnTransformerLanguageModel,
    knnlm_transformer_lm_small,
    knnlm_transformer_lm_tiny,
    knnlm_transformer_lm_wiki103,
)

RESULTS = Path(__file__).resolve().parent / "results"
ARCHS = {"tiny": knnlm_transformer_lm_tiny, "small": knnlm_transformer_lm_small}
WIKI103_VOCAB = 267_744
WIKI103_DIM = 1024
GIB = 1 << 30


class _Task:
    """What a model and a criterion read from a fairseq language-modeling task."""

    def __init__(self, dictionary: Dictionary) -> None:
        self.dictionary = self.source_dictionary = self.target_dictionary = dictionary


def make_task(vocab: int) -> _Task:
    dictionary = Dictionary()
    for i in range(vocab - dictionary.nspecial):
        dictionary.add_symbol(f"w{i}")
    return _Task(dictionary)


def build_model(arch: str, task: _Task, seq_len: int, device: torch.device) -> torch.nn.Module:
    args = argparse.Namespace(tokens_per_sample=seq_len, max_target_positions=seq_len)
    ARCHS[arch](args)
    return KnnTransformerLanguageModel.build_model(args, task).to(device).train()


def make_batches(task: _Task, n: int, rows: int, seq_len: int, device: torch.device, seed: int) -> list[dict]:
    """Zipfian word ids (exponent 1.1), like running text: many repeats of frequent words."""
    rng = np.random.default_rng(seed)
    first, vocab = task.dictionary.nspecial, len(task.dictionary)
    batches = []
    for _ in range(n):
        ids = np.minimum(rng.zipf(1.1, size=(rows, seq_len + 1)) - 1, vocab - first - 1) + first
        tokens = torch.from_numpy(ids).to(device)
        batches.append(
            {
                "net_input": {"src_tokens": tokens[:, :-1], "src_lengths": torch.full((rows,), seq_len)},
                "target": tokens[:, 1:].contiguous(),
                "ntokens": rows * seq_len,
                "nsentences": rows,
            }
        )
    return batches


def make_criteria(task: _Task, adaptive: bool, queue_size: int) -> dict[str, torch.nn.Module]:
    baseline = AdaptiveLoss(task, sentence_avg=False) if adaptive else CrossEntropyCriterion(task, False)
    return {
        "cross_entropy": baseline,
        "activation_l2": ActivationL2Criterion(task, activation_weight=1.0),
        "moco_queue": MocoQueueCriterion(task, activation_weight=1.0, queue_size=queue_size, queue_max_gib=64),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Trainee:
    """One criterion with its own model copy and optimizer; ``steps`` counts fairseq updates."""

    def __init__(self, criterion: torch.nn.Module, model: torch.nn.Module) -> None:
        self.criterion, self.model = criterion, model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        self.steps = 0

    def step(self, sample: dict) -> None:
        self.model.set_num_updates(self.steps)  # what fairseq's task.train_step does first
        self.optimizer.zero_grad(set_to_none=True)
        loss, _, _ = self.criterion(self.model, sample)
        loss.backward()
        self.optimizer.step()
        self.steps += 1


def time_block(trainee: Trainee, batches: list[dict], device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of ``len(batches)`` updates."""
    _sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    for sample in batches:
        trainee.step(sample)
    _sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


def memory_table(sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        row = {"queue_size": size}
        for dtype in ("fp32", "fp16"):
            row[f"{dtype}_gib"] = round(queue_bytes(WIKI103_VOCAB, size, WIKI103_DIM, dtype) / GIB, 3)
        rows.append(row)
    return rows


def wiki103_parameters() -> int:
    """Parameters of ``knnlm_transformer_lm_wiki103`` on WIKI-103's vocabulary, counted on the meta device."""
    args = argparse.Namespace(tokens_per_sample=3072, max_target_positions=3072)
    knnlm_transformer_lm_wiki103(args)
    with torch.device("meta"):
        model = KnnTransformerLanguageModel.build_model(args, make_task(WIKI103_VOCAB))
    return sum(p.numel() for p in model.parameters())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--vocab", type=int, default=33_278, help="dictionary size (33,278 = WIKI-2)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--tokens-per-batch", type=int, default=2048)
    parser.add_argument("--steps", type=int, default=5, help="timed updates per criterion per repetition")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2, help="untimed updates per criterion first")
    parser.add_argument("--queue-size", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "criteria")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(args.seed)

    task = make_task(args.vocab)
    rows = max(1, args.tokens_per_batch // args.seq_len)
    base_model = build_model(args.arch, task, args.seq_len, device)
    adaptive = base_model.decoder.adaptive_softmax is not None
    trainees = {
        name: Trainee(criterion.to(device), copy.deepcopy(base_model))
        for name, criterion in make_criteria(task, adaptive, args.queue_size).items()
    }
    batches = make_batches(task, args.warmup + args.steps * args.reps, rows, args.seq_len, device, args.seed)
    for trainee in trainees.values():  # builds the MoCo state, warms caches and allocators
        for sample in batches[: args.warmup]:
            trainee.step(sample)

    names = list(trainees)
    seconds: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for rep in range(args.reps):
        block = batches[args.warmup + rep * args.steps : args.warmup + (rep + 1) * args.steps]
        for name in names[rep % len(names) :] + names[: rep % len(names)]:
            wall, cpu = time_block(trainees[name], block, device)
            seconds[name]["wall"].append(wall)
            seconds[name]["cpu"].append(cpu)

    tokens = rows * args.seq_len * args.steps
    baseline = "cross_entropy"
    result = {
        "command": " ".join([Path(sys.argv[0]).as_posix(), *(sys.argv[1:] if argv is None else argv)]),
        "machine": {
            "platform": platform.platform(),
            "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(device),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        },
        "setup": {
            "arch": f"knnlm_transformer_lm_{args.arch}",
            "parameters": sum(p.numel() for p in base_model.parameters()),
            "vocab": args.vocab,
            "adaptive_softmax": adaptive,
            "baseline": type(trainees[baseline].criterion).__name__,
            "tokens_per_update": rows * args.seq_len,
            "seq_len": args.seq_len,
            "timed_updates_per_rep": args.steps,
            "reps": args.reps,
            "activation_weight": 1.0,
            "queue_size": args.queue_size,
            "queue_dtype": "fp32",
            "moco_momentum": 0.999,
        },
        "throughput": {},
        "wiki103_moco_memory": {
            "vocab": WIKI103_VOCAB,
            "dim": WIKI103_DIM,
            "queues": memory_table([1, 2, 4, 8, 16]),
            "momentum_encoder_fp32_gib": round(wiki103_parameters() * 4 / GIB, 3),
        },
    }
    clocks = ["wall", "cpu"] if device.type == "cpu" else ["wall"]
    for name in names:
        result["throughput"][name] = {}
        for clock in clocks:
            per_rep = [tokens / s for s in seconds[name][clock]]
            ratios = [b / s for s, b in zip(seconds[name][clock], seconds[baseline][clock], strict=True)]
            result["throughput"][name][clock] = {
                "tokens_per_s_median": round(statistics.median(per_rep), 1),
                "tokens_per_s_per_rep": [round(x, 1) for x in per_rep],
                "relative_to_cross_entropy_median": round(statistics.median(ratios), 3),
                "relative_per_rep": [round(x, 3) for x in ratios],
            }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(_markdown(result))
    return result


def _markdown(result: dict) -> str:
    setup, machine = result["setup"], result["machine"]
    lines = [
        "# Training throughput of the regularized criteria",
        "",
        f"`{result['command']}`",
        "",
        f"{setup['arch']} ({setup['parameters']:,} parameters, vocabulary {setup['vocab']:,}, "
        f"{'adaptive' if setup['adaptive_softmax'] else 'full'} softmax), {setup['tokens_per_update']} "
        f"tokens per update, random Zipfian text; {setup['reps']} interleaved repetitions of "
        f"{setup['timed_updates_per_rep']} updates per criterion; baseline {setup['baseline']}. "
        f"Machine: {machine['device']}, {machine['threads']} thread(s), torch {machine['torch']}.",
        "",
        "Relative = median over repetitions of (baseline seconds / criterion seconds) for the same "
        "batches. `cpu` clock: this process's CPU seconds (on a CPU shared with other jobs it is "
        "the steadier measure of the work done; `wall` includes waiting for the cores).",
        "",
        "| criterion | clock | tokens/s (median) | relative to cross-entropy |",
        "| --- | --- | ---: | ---: |",
    ]
    for name, clocks in result["throughput"].items():
        for clock, row in clocks.items():
            lines.append(
                f"| {name} | {clock} | {row['tokens_per_s_median']:,.0f} | "
                f"{row['relative_to_cross_entropy_median']:.3f} |"
            )
    memory = result["wiki103_moco_memory"]
    lines += [
        "",
        f"activation_l2: ω = {setup['activation_weight']}; moco_queue: ω = {setup['activation_weight']}, "
        f"L = {setup['queue_size']}, {setup['queue_dtype']} queues, m = {setup['moco_momentum']} "
        "(one extra no-grad forward of the momentum encoder per batch, plus its update).",
        "",
        f"## MoCo queue memory at WIKI-103 scale (V = {memory['vocab']:,}, D = {memory['dim']})",
        "",
        "Queues take V·L·D·bytes (bf16 as fp16). The momentum encoder, an fp32 copy of "
        f"`knnlm_transformer_lm_wiki103`, adds {memory['momentum_encoder_fp32_gib']} GiB.",
        "",
        "| L | fp32 GiB | fp16/bf16 GiB |",
        "| ---: | ---: | ---: |",
    ]
    for row in memory["queues"]:
        lines.append(f"| {row['queue_size']} | {row['fp32_gib']} | {row['fp16_gib']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
