"""Run under ``torchrun`` by tests/test_distributed_learner.py: a few learner steps on N ranks.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/learner_ranks.py \\
        MODEL_DIR TRAJECTORIES.pt OUT_DIR --stages 2 3 [--save-after 1] [--resume CKPT_DIR]

For each ZeRO stage: build a learner (float32), optionally resume from a checkpoint, take one
step per trajectory batch (rank 0 leads, the other ranks follow, as in the learner service),
optionally write a checkpoint after ``--save-after`` steps, and let rank 0 write the gathered
final weights to ``OUT_DIR/stage{S}.safetensors`` and the per-step metrics to ``stage{S}.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowlane.trainer.distributed import follow, lead
from flowlane.trainer.learner import Learner
from flowlane.trainer.learner_config import LearnerConfig


def config(model_dir: str, stage: int) -> LearnerConfig:
    return LearnerConfig(model_path=model_dir, lr=1e-3, zero_stage=stage, dtype="float32", kl_beta=0.01,
                         micro_batch_tokens=48, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model_dir")
    parser.add_argument("trajectories")
    parser.add_argument("out_dir")
    parser.add_argument("--stages", type=int, nargs="+", default=[2])
    parser.add_argument("--save-after", type=int, default=0)
    parser.add_argument("--resume", default="")
    args = parser.parse_args()
    batches = torch.load(args.trajectories, weights_only=False)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stage in args.stages:
        learner = Learner(config(args.model_dir, stage))
        if learner.rank != 0:
            follow(learner)
            continue
        leader = lead(learner)
        done = 0
        if args.resume:
            meta = leader.load_checkpoint_files(Path(args.resume) / f"stage{stage}")
            done = int(meta["step"])
        metrics = []
        for number, batch in enumerate(batches[done:], start=done + 1):
            metrics.append(leader.step(batch))
            if number == args.save_after:
                leader.save_checkpoint_files(out / "ckpt" / f"stage{stage}")
        weights = {name: tensor.clone() for name, tensor in leader.export_weights()}
        save_file(weights, str(out / f"stage{stage}.safetensors"))
        (out / f"stage{stage}.json").write_text(json.dumps(metrics))
        leader.close()


if __name__ == "__main__":
    main()
