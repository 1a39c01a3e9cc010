"""Run under ``torchrun`` by tests/test_distributed_learner.py: a few learner steps on N ranks.

    python -m torch.distributed.run --standalone --nproc-per-node N tests/learner_ranks.py \\
        MODEL_DIR TRAJECTORIES.pt OUT_DIR --stages 2 3 [--save-after 1] [--resume CKPT_DIR]
        [--store URI --scratch DIR [--resume-from-store]]

For each ZeRO stage: build a learner (float32), optionally resume from a checkpoint, take one
step per trajectory batch (rank 0 leads, the other ranks follow, as in the learner service),
optionally write a checkpoint after ``--save-after`` steps, and let rank 0 write the gathered
final weights to ``OUT_DIR/stage{S}.safetensors`` and the per-step metrics to ``stage{S}.json``.

With ``--store`` checkpoints go through a checkpoint store (``URI/stage{S}``) as in the learner
service: rank 0 writes into a temporary directory under ``--scratch`` and commits it with the
parts that pods without that directory uploaded; ``--resume-from-store`` resumes from its latest.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from flowlane.kit.checkpoints import CheckpointStore
from flowlane.trainer.distributed import follow, lead, load_on_every_pod, save_on_every_pod
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
    parser.add_argument("--store", default="")
    parser.add_argument("--scratch", default="")
    parser.add_argument("--resume-from-store", action="store_true")
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
        store = CheckpointStore.from_uri(f"{args.store}/stage{stage}") if args.store else None
        done = 0
        if args.resume:
            meta = leader.load_checkpoint_files(Path(args.resume) / f"stage{stage}")
            done = int(meta["step"])
        if store is not None and args.resume_from_store:
            ref = store.latest()
            assert ref is not None, f"no checkpoint in {store.location}"
            with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
                meta = load_on_every_pod(leader, store.download(ref, Path(tmp) / "ckpt"), store, ref.step)
            done = int(meta["step"])
        metrics = []
        for number, batch in enumerate(batches[done:], start=done + 1):
            metrics.append(leader.step(batch))
            if number == args.save_after and store is not None:
                with tempfile.TemporaryDirectory(dir=args.scratch) as tmp:
                    meta, parts = save_on_every_pod(leader, Path(tmp), store, number)
                    store.save(number, Path(tmp), meta, parts=parts)
            elif number == args.save_after:
                leader.save_checkpoint_files(out / "ckpt" / f"stage{stage}")
        weights = {name: tensor.clone() for name, tensor in leader.export_weights()}
        save_file(weights, str(out / f"stage{stage}.safetensors"))
        (out / f"stage{stage}.json").write_text(json.dumps(metrics))
        leader.close()


if __name__ == "__main__":
    main()
