"""Engine throughput and log-prob fidelity: vLLM's CPU build (float32, bfloat16) vs transformers.

Two questions decide which engine and which precision the rollout workers use on CPU:

1. **Throughput.** Many concurrent generations, as in a Flow-GRPO rollout: ``--requests`` chat
   requests (arithmetic questions of the bundled training split) submitted at once, each sampling
   ``--max-tokens`` tokens at temperature 0.7 with its own seed. Generated tokens per second of
   wall time, after one warm-up request. Each engine runs in a fresh process of its own, one after
   the other, so no two compete for the cores.
2. **Fidelity.** The learner re-scores every sampled token in float32 (``logits / temperature``,
   log-softmax) and the truncated importance weight is ``exp(learner - sampler)``; a sampler
   whose log-probs drift from the learner's biases the update. So the tokens each engine sampled
   are re-scored here by a float32 ``transformers`` forward pass of the same model, and the table
   shows the largest and the mean absolute difference in nats.

Run ``.venv/bin/python bench/engines.py [--requests 32] [--max-tokens 128]``. vLLM computes on all
cores but one (one is kept for its serving loop), so the transformers engine gets ``cores - 1``
threads: the same compute.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py

MODEL = "smollm2-135m-instruct"
TEMPERATURE = 0.7
#: (label, engine kind, dtype) of each measured engine.
ENGINES = (
    ("vLLM (CPU build), float32", "vllm", "float32"),
    ("vLLM (CPU build), bfloat16", "vllm", "bfloat16"),
    ("transformers, batched generate, float32", "transformers", "float32"),
)


def questions(n: int) -> list[str]:
    from flowlane.kit.tasks import load_tasks

    tasks = load_tasks("arithmetic", "train")
    return [tasks[i % len(tasks)].question for i in range(n)]


async def _measure(kind: str, dtype: str, prompts: list[str], max_tokens: int) -> dict[str, Any]:
    from flowlane.runtime.engines.base import SamplingSettings
    from flowlane.runtime.engines.factory import create_engine

    options: dict[str, Any] = {"dtype": dtype}
    if kind == "transformers":
        options["num_threads"] = max(1, common.usable_cores() - 1)
    started = time.monotonic()
    engine = create_engine(kind, MODEL, **options)
    start_s = time.monotonic() - started
    try:
        await engine.chat([{"role": "user", "content": "Say hi."}], SamplingSettings(max_tokens=8, seed=0))
        settings = [SamplingSettings(max_tokens=max_tokens, temperature=TEMPERATURE, seed=i)
                    for i in range(len(prompts))]
        began = time.monotonic()
        generations = await asyncio.gather(*(
            engine.chat([{"role": "user", "content": prompt}], setting)
            for prompt, setting in zip(prompts, settings, strict=True)
        ))
        wall = time.monotonic() - began
    finally:
        await engine.close()
    return {
        "start_s": start_s,
        "wall_s": wall,
        "generated": sum(len(g.token_ids) for g in generations),
        "samples": [{"prompt_ids": g.prompt_ids, "token_ids": g.token_ids, "logprobs": g.logprobs}
                    for g in generations],
    }


def run_child(kind: str, dtype: str, requests: int, max_tokens: int, out: Path) -> None:
    result = asyncio.run(_measure(kind, dtype, questions(requests), max_tokens))
    out.write_text(json.dumps(result))


def measure_in_fresh_process(kind: str, dtype: str, requests: int, max_tokens: int) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="flowlane-bench-engines-") as tmp:
        out = Path(tmp) / "result.json"
        subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--child", kind, dtype, "--requests", str(requests),
             "--max-tokens", str(max_tokens), "--out", str(out)],
            check=True,
        )
        result: dict[str, Any] = json.loads(out.read_text())
        return result


def logprob_differences(samples: list[dict[str, Any]]) -> tuple[float, float]:
    """Max and mean |sampler - float32 re-scoring| over every sampled token, in nats."""
    import torch
    from transformers import AutoModelForCausalLM

    from flowlane.kit.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(str(resolve_model(MODEL)), dtype=torch.float32).eval()
    differences: list[torch.Tensor] = []
    with torch.no_grad():
        for sample in samples:
            prompt, response = sample["prompt_ids"], sample["token_ids"]
            if not response:
                continue
            ids = torch.tensor([prompt + response])
            logits = model(ids).logits[0, len(prompt) - 1 : len(prompt) + len(response) - 1].float()
            rescored = torch.log_softmax(logits / TEMPERATURE, dim=-1).gather(1, torch.tensor(response)[:, None])[:, 0]
            differences.append((rescored - torch.tensor(sample["logprobs"])).abs())
    every = torch.cat(differences)
    return float(every.max()), float(every.mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32, help="concurrent generations per engine")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens each generation may sample")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "DTYPE"), help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, dtype = args.child
        run_child(kind, dtype, args.requests, args.max_tokens, args.out)
        return

    machine = common.machine_lines()
    rows = []
    for label, kind, dtype in ENGINES:
        result = measure_in_fresh_process(kind, dtype, args.requests, args.max_tokens)
        max_diff, mean_diff = logprob_differences(result["samples"])
        rows.append({
            "engine": label,
            "start s": result["start_s"],
            "generated tokens": result["generated"],
            "wall s": result["wall_s"],
            "generated tokens/s": result["generated"] / result["wall_s"],
            "max Δ log-prob, nat": f"{max_diff:.1e}",
            "mean Δ log-prob, nat": f"{mean_diff:.1e}",
        })
    baseline = rows[-1]["generated tokens/s"]
    for row in rows:
        row["vs transformers"] = f"{row['generated tokens/s'] / baseline:.2f}x"
    common.print_header(
        "Engines: generated tokens/s and log-prob fidelity",
        [f"{args.requests} concurrent chat requests, {args.max_tokens} tokens max each, temperature {TEMPERATURE}, "
         f"model {MODEL}; Δ log-prob: the absolute difference between the engine's sampling log-prob and "
         "a float32 transformers re-scoring of the same tokens (what the learner computes)"],
        machine=machine,
    )
    print(common.markdown_table(rows, ["engine", "start s", "generated tokens", "wall s", "generated tokens/s",
                                       "vs transformers", "max Δ log-prob, nat", "mean Δ log-prob, nat"]))
    print(f"\n- load average at end (1, 5, 15 min): {common.load_average()}")


if __name__ == "__main__":
    main()
