"""Learner throughput: the batched Flow-GRPO step vs one turn at a time, on the same data.

A Flow-GRPO update trains on many planner turns of different lengths. The learner lays them out in
micro-batches under a token budget: as a prefix tree in one row, so prompt prefixes that turns
share are computed once (``shared``, the default), as length-sorted padded rows, or packed end to
end in one row (see ``flowlane.trainer.batching``); the naive alternative runs each turn through
forward and backward on its own. ``--system-tokens 290`` gives the synthetic turns the prefix
structure of real planner turns (the README's table). All modes here are the same ``Learner.step`` on the same
synthetic trajectories with the real bundled model (SmolLM2-135M-Instruct, float32, full
fine-tuning, KL to a reference model), differing only in the layout and ``micro_batch_tokens``
(1 puts every turn alone). Reported per mode: forward passes per step, padding share, the share
of positions actually computed, tokens per step (prompt + response), the median step time and
tokens/s (tokens / step time: forward, backward, reference forward and optimizer step).

Checkpoint save/load MB/s rows come from ``bench/checkpoint_io.py`` (the checkpoint store on local
disk vs the S3 endpoint) and are appended when that module is present.

On a shared machine wall time moves with the load other processes put on it, so each step's CPU
time (``time.process_time``, this process only) is reported too and the speedup is computed from
it; with one torch thread (``--threads 1``) CPU time is the work done, whatever the load.

Run ``python bench/learner.py [--threads 1] [--steps 2] [--questions 2] [--group-size 4] [--system-tokens 290]``.
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from flowlane.api.enums import Dtype
from flowlane.api.trajectory import Trajectory
from flowlane.kit.models import resolve_model
from flowlane.trainer.batching import BatchLayout
from flowlane.trainer.learner import Learner
from flowlane.trainer.learner_config import LearnerConfig
from flowlane.trainer.synthetic import synthetic_trajectories

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py


def bench_mode(
    layout: BatchLayout, model_dir: Path, trajectories: list[Trajectory], micro_batch_tokens: int, steps: int
) -> dict[str, Any]:
    config = LearnerConfig(
        model_path=str(model_dir),
        lr=1e-6,
        dtype=Dtype.FLOAT32,
        kl_beta=0.001,
        micro_batch_tokens=micro_batch_tokens,
        batch_layout=layout,
    )
    learner = Learner(config)
    runs: list[dict[str, float]] = []
    cpu_s: list[float] = []
    try:
        learner.step(trajectories)  # warm-up: allocator, optimizer state
        for _ in range(steps):
            started = time.process_time()
            runs.append(learner.step(trajectories))
            cpu_s.append(time.process_time() - started)
    finally:
        learner.close()
        del learner
        gc.collect()
    step_s = statistics.median(r["step_time_s"] for r in runs)
    step_cpu_s = statistics.median(cpu_s)
    tokens = runs[0]["tokens_processed"]
    return {
        "mode": "one turn at a time" if micro_batch_tokens == 1 else f"{layout.value} micro-batches",
        "micro_batch_tokens": micro_batch_tokens,
        "forward_passes": int(runs[0]["micro_batches"]),
        "padding": f"{100 * runs[0]['padding_frac']:.1f}%",
        "computed": f"{100 * runs[0]['computed_frac']:.0f}%",
        "tokens_per_step": int(tokens),
        "step_s": round(step_s, 2),
        "tokens_per_s": round(tokens / step_s, 1),
        "step_cpu_s": round(step_cpu_s, 2),
        "tokens_per_cpu_s": round(tokens / step_cpu_s, 1),
    }


def format_table(rows: list[dict[str, Any]], headers: list[str]) -> str:
    widths = {h: max(len(h), *(len(str(r[h])) for r in rows)) for h in headers}
    lines = [" | ".join(h.ljust(widths[h]) for h in headers), "-|-".join("-" * widths[h] for h in headers)]
    lines += [" | ".join(str(r[h]).ljust(widths[h]) for h in headers) for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--model", default="smollm2-135m-instruct", help="model directory or known name")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per mode (after one warm-up step)")
    parser.add_argument("--questions", type=int, default=2)
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--max-turns", type=int, default=3)
    parser.add_argument("--prompt-tokens", type=int, nargs=2, default=(32, 160), metavar=("MIN", "MAX"))
    parser.add_argument("--response-tokens", type=int, nargs=2, default=(16, 64), metavar=("MIN", "MAX"))
    parser.add_argument("--system-tokens", type=int, default=0,
                        help="tokens every prompt starts with (the planner's system prompt: ~330); > 0 also "
                             "gives a group's trajectories the same first-turn prompt, as real rollouts do")
    parser.add_argument("--micro-batch-tokens", type=int, default=2048, help="token budget of the batched modes")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch default)")
    parser.add_argument("--checkpoint-mb", type=int, default=540, help="checkpoint I/O size; 0 skips those rows")
    args = parser.parse_args(argv)

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    model_dir = resolve_model(args.model)
    from transformers import AutoConfig

    vocab = int(AutoConfig.from_pretrained(str(model_dir)).vocab_size)
    prompt_tokens, response_tokens = tuple(args.prompt_tokens), tuple(args.response_tokens)
    trajectories = synthetic_trajectories(
        0, args.questions, args.group_size, vocab, max_turns=args.max_turns, prompt_len=prompt_tokens,
        response_len=response_tokens, logprob_range=(8.0, 12.0),
        rewards=[[float(k % 2 == 0) for k in range(args.group_size)] for _ in range(args.questions)],
        system_tokens=args.system_tokens, shared_first_prompt=args.system_tokens > 0,
    )
    turns = sum(len(t.planner_turns) for t in trajectories)
    common.print_header("flowlane learner benchmark", [f"torch threads {torch.get_num_threads()}"])
    print(
        f"# model: {model_dir.name} (float32, full fine-tuning, KL reference); data: {len(trajectories)} "
        f"trajectories, {turns} planner turns"
    )
    rows = [bench_mode(layout, model_dir, trajectories, args.micro_batch_tokens, args.steps) for layout in BatchLayout]
    rows.append(bench_mode(BatchLayout.PADDED, model_dir, trajectories, 1, args.steps))
    base = rows[-1]["tokens_per_cpu_s"]
    for row in rows:
        row["speedup"] = f"{row['tokens_per_cpu_s'] / base:.2f}x"
    headers = ["mode", "micro_batch_tokens", "forward_passes", "padding", "computed", "tokens_per_step", "step_s"]
    headers += ["tokens_per_s"]
    headers += ["step_cpu_s", "tokens_per_cpu_s", "speedup"]
    print(format_table(rows, headers))

    if args.checkpoint_mb > 0:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        try:
            import checkpoint_io
        except ImportError:
            print("\n# checkpoint I/O: bench/checkpoint_io.py not found, rows skipped")
            return
        print(f"\n# checkpoint I/O ({args.checkpoint_mb} MB, bench/checkpoint_io.py)")
        print(checkpoint_io.format_table(checkpoint_io.run(args.checkpoint_mb, 1)))


if __name__ == "__main__":
    main()
