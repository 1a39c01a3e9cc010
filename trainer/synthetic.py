"""Synthetic scored planner trajectories, for the learner's tests and ``bench/learner.py``.

Random token ids in the shape of real planner turns (1 to ``max_turns`` turns per trajectory,
prompt and response lengths drawn from ranges, sampling log-probs drawn from a range). Optionally
with the prefix structure of real planner prompts: ``system_tokens`` that every turn starts with
(the planner's system prompt and worked examples), and ``shared_first_prompt``: the trajectories
of a group see the same first-turn prompt (same question and analysis, empty memory).
"""

from __future__ import annotations

import random

from flowlane.api.trajectory import PlannerTurn, Trajectory


def synthetic_trajectories(
    seed: int,
    questions: int = 3,
    group_size: int = 3,
    vocab: int = 128,
    policy_version: int = 0,
    max_turns: int = 3,
    prompt_len: tuple[int, int] = (4, 16),
    response_len: tuple[int, int] = (1, 8),
    rewards: list[list[float]] | None = None,
    logprob_range: tuple[float, float] = (3.5, 6.0),
    system_tokens: int = 0,
    shared_first_prompt: bool = False,
) -> list[Trajectory]:
    """``questions`` groups of ``group_size`` trajectories; rewards given or drawn at p = 0.5."""
    rng = random.Random(seed)
    system = [rng.randrange(vocab) for _ in range(system_tokens)]
    result = []
    for q in range(questions):
        first_prompt: list[int] | None = None
        for k in range(group_size):
            turns = []
            for turn in range(rng.randint(1, max_turns)):
                response = [rng.randrange(vocab) for _ in range(rng.randint(*response_len))]
                if shared_first_prompt and turn == 0 and first_prompt is not None:
                    prompt = first_prompt
                else:
                    prompt = system + [rng.randrange(vocab) for _ in range(rng.randint(*prompt_len))]
                    if turn == 0 and first_prompt is None:
                        first_prompt = prompt
                turns.append(
                    PlannerTurn(
                        prompt_ids=prompt,
                        response_ids=response,
                        logprobs=[-rng.uniform(*logprob_range) for _ in response],
                        policy_version=policy_version,
                    )
                )
            reward = rewards[q][k] if rewards is not None else float(rng.random() < 0.5)
            qid = f"q{seed}-{q}"
            result.append(Trajectory(question=qid, question_id=qid, planner_turns=turns, reward=reward))
    return result
