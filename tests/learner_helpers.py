"""Builders shared by the learner tests: a tiny random model directory and synthetic trajectories.

A tiny model of the bundled model's architecture (Llama) keeps learner tests at seconds where the
real weights do not matter (packing, resume, LoRA bookkeeping); tests about learning direction use
the real model.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from flowlane.runtime.trajectory import PlannerTurn, Trajectory

TINY_VOCAB = 128


def make_tiny_model_dir(path: Path, seed: int = 0, hidden_size: int = 32) -> Path:
    """A randomly initialised 2-layer Llama with a tied embedding, saved in HF layout at ``path``."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(
        vocab_size=TINY_VOCAB,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    return path


def synthetic_trajectories(
    seed: int,
    questions: int = 3,
    group_size: int = 3,
    vocab: int = TINY_VOCAB,
    policy_version: int = 0,
    max_turns: int = 3,
    prompt_len: tuple[int, int] = (4, 16),
    response_len: tuple[int, int] = (1, 8),
    rewards: list[list[float]] | None = None,
) -> list[Trajectory]:
    """Groups of scored trajectories with random token ids and plausible sampling log-probs."""
    rng = random.Random(seed)
    result = []
    for q in range(questions):
        for k in range(group_size):
            turns = []
            for _ in range(rng.randint(1, max_turns)):
                response = [rng.randrange(vocab) for _ in range(rng.randint(*response_len))]
                turns.append(
                    PlannerTurn(
                        prompt_ids=[rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))],
                        response_ids=response,
                        logprobs=[-rng.uniform(3.5, 6.0) for _ in response],
                        policy_version=policy_version,
                    )
                )
            reward = rewards[q][k] if rewards is not None else float(rng.random() < 0.5)
            qid = f"q{seed}-{q}"
            result.append(Trajectory(question=qid, question_id=qid, planner_turns=turns, reward=reward))
    return result
