"""Training-step cost of the datastore replacements' heads relative to the base LM's output layer.

    .venv/bin/python benchmarks/bench_replacements.py [--vocab 33280] [--dim 256] [--tokens 2048]
        [--ns 1,2,3,6] [--mos 2,3] [--reps 5] [--threads 1] [--out benchmarks/results/replacements]

A head's update (forward, cross-entropy, backward, Adam step) on fixed random
features is timed against the update of a plain ``V × D`` softmax of the same
vocabulary (the n = 1 learned W_ds without aggregation), in interleaved
repetitions so that every variant sees the same machine load; ratios are medians
of per-repetition (variant tokens/s) / (softmax tokens/s). Each head is timed
twice: through its whole ``[tokens, V]`` distribution gathered at the targets
(``head(h)``) and through ``head.target_log_probs`` (what training uses). The frozen base's
transformer layers are not part of the head's cost and are left out. Results:
``<out>.json`` and ``<out>.md``.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn

from knnlm.softmax_alternatives.aggregation import uniform_row_word
from knnlm.softmax_alternatives.heads import LearnedDatastore, MixtureOfSoftmaxes

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cpu_model, spread  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


class PlainSoftmax(nn.Module):
    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.out = nn.Linear(dim, vocab, bias=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.out(h), dim=-1)


def step_time(
    head: nn.Module, opt: torch.optim.Optimizer, h: torch.Tensor, y: torch.Tensor, targets_only: bool
) -> float:
    start = time.perf_counter()
    opt.zero_grad()
    if targets_only:
        loss = -head.target_log_probs(h, y).sum()
    else:
        loss = -head(h).gather(-1, y.unsqueeze(-1)).sum()
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=33280)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--tokens", type=int, default=2048)
    parser.add_argument("--ns", default="1,2,3,6")
    parser.add_argument("--mos", default="2,3")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=RESULTS / "replacements")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    v, d = args.vocab, args.dim
    variants: dict[str, nn.Module] = {}
    for n in (int(x) for x in args.ns.split(",")):
        variants[f"learned W_ds, n={n}"] = LearnedDatastore(d, v, uniform_row_word(v, n))
    for r in (int(x) for x in args.mos.split(",")):
        variants[f"MoS, R={r}, W_sm fine-tuned"] = MixtureOfSoftmaxes(d, v, r, torch.randn(v, d) / d**0.5, None, True)
    heads: dict[str, nn.Module] = {"softmax V×D (baseline)": PlainSoftmax(d, v)}
    targets_only: dict[str, bool] = {}
    for name, head in variants.items():
        heads[f"{name}, whole distribution"] = head
        heads[f"{name}, targets only"] = copy.deepcopy(head)
        targets_only[f"{name}, targets only"] = True
    opts = {
        name: torch.optim.Adam([p for p in head.parameters() if p.requires_grad], lr=1e-3)
        for name, head in heads.items()
    }
    h = torch.randn(args.tokens, d)
    y = torch.randint(0, v, (args.tokens,))
    for name, head in heads.items():  # warm-up
        step_time(head, opts[name], h, y, targets_only.get(name, False))
    times: dict[str, list[float]] = {name: [] for name in heads}
    names = list(heads)
    for rep in range(args.reps):
        for name in names[rep % len(names):] + names[: rep % len(names)]:
            times[name].append(step_time(heads[name], opts[name], h, y, targets_only.get(name, False)))
    base = names[0]
    rows = []
    for name in names:
        tps = [args.tokens / t for t in times[name]]
        ratio = [t_base / t for t, t_base in zip(times[name], times[base], strict=True)]
        rows.append({"head": name, "tokens_per_s": spread(tps, 1), "speed_vs_softmax": spread(ratio, 3),
                     "parameters": sum(p.numel() for p in heads[name].parameters() if p.requires_grad)})
    result = {"benchmark": "replacements", "cpu": cpu_model(), "threads": args.threads, "vocab": v, "dim": d,
              "tokens": args.tokens, "reps": args.reps, "torch": torch.__version__, "rows": rows,
              "command": "python benchmarks/bench_replacements.py " + " ".join(sys.argv[1:])}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Datastore-replacement heads: training step vs a V×D softmax (V={v}, D={d}, {args.tokens} tokens)",
             "", f"{cpu_model()}, {args.threads} thread(s), torch {torch.__version__}, {args.reps} interleaved reps. "
             f"`{result['command']}`", "",
             "| head | trainable params | tokens/s (median) | speed vs softmax (median, min–max) |",
             "|---|---:|---:|---:|"]
    for row in rows:
        s = row["speed_vs_softmax"]
        lines.append(f"| {row['head']} | {row['parameters']:,} | {row['tokens_per_s']['median']:,.0f} | "
                     f"{s['median']:.3f} ({s['min']:.3f}–{s['max']:.3f}) |")
    args.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
