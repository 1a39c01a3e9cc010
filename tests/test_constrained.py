"""Scoring schema-constrained planner turns under their grammar (``flowlane.trainer.constrained``).

vLLM samples planner turns under the planner's JSON schema, so their sampling log-probs are
normalised over the tokens the grammar allows. The learner replays that mask with xgrammar; these
tests check the replay on a tiny schema (fast) and, with the real engine and model, that the
learner's masked log-probs are the sampling log-probs and the importance weights of fresh samples
are 1.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from flowlane.api.trajectory import PlannerTurn, Trajectory
from flowlane.kit.grpc_common import trajectory_from_record, trajectory_to_record
from flowlane.trainer.constrained import GrammarMasks, masked_log_softmax, stop_token_ids

YES_NO = json.dumps({
    "type": "object",
    "properties": {"answer": {"type": "string", "enum": ["yes", "no"]}},
    "required": ["answer"],
    "additionalProperties": False,
})


@pytest.fixture(scope="module")
def tokenizer(model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread next to the session's vLLM worker on a 2-core machine (see test_learner)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def json_reply(tokenizer: Any, text: str) -> list[int]:
    """The ids of a reply ``text`` as the engine records it: the text's tokens, then the stop token."""
    return [*tokenizer.encode(text, add_special_tokens=False), tokenizer.eos_token_id]


# --- the mask replay (fast) ------------------------------------------------------------------------


def test_the_replayed_mask_allows_each_sampled_token_and_normalises_over_the_allowed_ones(
    model_dir: Path, tokenizer
) -> None:
    eos = tokenizer.eos_token_id
    response = json_reply(tokenizer, '{"answer": "yes"}')
    vocab = len(tokenizer)
    masks = GrammarMasks(model_dir, vocab)

    allowed = masks.allowed([(YES_NO, response)])

    assert allowed is not None and allowed.shape == (len(response), vocab)
    assert allowed[torch.arange(len(response)), torch.tensor(response)].all()  # every sampled token
    hello = tokenizer.encode("hello", add_special_tokens=False)[0]
    assert not allowed[0, hello] and not allowed[0, eos]  # a JSON object must open first
    assert allowed[-1, eos] and allowed[-1].sum() < 10  # complete: the stop token (and whitespace)
    assert (allowed.sum(dim=1) < vocab // 10).all()  # every position is actually constrained

    logits = torch.randn(len(response), vocab, generator=torch.Generator().manual_seed(0))
    log_probs = masked_log_softmax(logits, allowed)
    assert torch.isneginf(log_probs[0, hello]) and torch.isneginf(log_probs[~allowed]).all()
    assert torch.isfinite(log_probs[allowed]).all()
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(len(response)))
    torch.testing.assert_close(masked_log_softmax(logits, None), torch.log_softmax(logits, dim=-1))


def test_rows_past_the_tokenizer_are_never_allowed(model_dir: Path, tokenizer) -> None:
    """The model's logits may be wider than the tokenizer (padded embedding rows); vLLM's
    xgrammar backend masks those rows, and so does the replay."""
    response = json_reply(tokenizer, '{"answer": "no"}')
    width = len(tokenizer) + 64

    allowed = GrammarMasks(model_dir, width).allowed([(YES_NO, response)])

    assert allowed is not None and allowed.shape == (len(response), width)
    assert not allowed[:, len(tokenizer):].any()


def test_unconstrained_turns_stay_unmasked_and_batches_keep_token_order(model_dir: Path, tokenizer) -> None:
    masks = GrammarMasks(model_dir, len(tokenizer))
    constrained = json_reply(tokenizer, '{"answer": "no"}')
    free = tokenizer.encode("just text", add_special_tokens=False)

    assert masks.allowed([("", free)]) is None
    mixed = masks.allowed([("", free), (YES_NO, constrained)])
    alone = masks.allowed([(YES_NO, constrained)])

    assert mixed is not None and alone is not None
    assert mixed[: len(free)].all()
    assert torch.equal(mixed[len(free):], alone)


def test_a_turn_the_grammar_rejects_is_scored_unmasked(model_dir: Path, tokenizer) -> None:
    masks = GrammarMasks(model_dir, len(tokenizer))
    wrong = tokenizer.encode('{"answer": "maybe"}', add_special_tokens=False)

    allowed = masks.allowed([(YES_NO, wrong)])

    assert allowed is not None and allowed.all()


def test_stop_tokens_are_the_tokenizer_eos_and_the_generation_config_eos(tmp_path: Path) -> None:
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert stop_token_ids(tmp_path, 2) == (2, 7, 9)
    assert stop_token_ids(tmp_path / "missing", 2) == (2,)


def test_the_schema_travels_with_the_turn_over_grpc() -> None:
    turn = PlannerTurn([1, 2], [3, 4], [-0.1, -0.2], policy_version=1, text="{}", json_schema=YES_NO)
    trajectory = Trajectory(question="q", question_id="q", planner_turns=[turn], reward=1.0)

    back = trajectory_from_record(trajectory_to_record(trajectory, "t-1"))

    assert back.planner_turns[0].json_schema == YES_NO
    assert Trajectory.from_dict(trajectory.to_dict()).planner_turns[0].json_schema == YES_NO


# --- the real engine and model ----------------------------------------------------------------------


@pytest.mark.asyncio(loop_scope="session")
async def test_masked_learner_log_probs_are_vllm_sampling_log_probs_under_the_planner_schema(
    vllm_engine, model_dir: Path, one_torch_thread: None
) -> None:
    """Planner turns sampled by vLLM under the planner's schema, re-scored by the learner.

    Tolerance 1e-3 nat per token: vLLM (CPU kernels, float32) and the learner (PyTorch eager,
    float32) compute the same logits with different fused kernels and summation orders, which moves
    a log-prob by ~1e-5 (tests/test_engines.py, unconstrained: max 4.1e-5); 1e-3 is far below a
    real error (an unmasked re-scoring of these turns was off by up to 0.66 nat) and the
    0.2 clip range of the ratio. The importance weights exp(old - behaviour) of fresh samples
    (old = the learner's masked log-probs at the same weights) must then average 1 within 1e-3;
    without the mask they average the allowed probability mass, below 1.
    """
    from flowlane.runtime.agent.planner import Planner
    from flowlane.runtime.agent.prompts import planner_schema
    from flowlane.runtime.engines.base import SamplingSettings
    from flowlane.trainer.flow_grpo import AdvantageMode
    from flowlane.trainer.learner import Learner
    from flowlane.trainer.learner_batch import prepare_batch
    from flowlane.trainer.learner_config import LearnerConfig

    temperature = 0.7
    cards = [
        {"name": "python", "description": "Runs Python code and returns what it prints."},
        {"name": "search", "description": "Searches a text collection and returns passages."},
    ]
    planner = Planner(vllm_engine, SamplingSettings(max_tokens=96, temperature=temperature))
    questions = ["What is 17 * 23?", "Who wrote Hamlet?", "How many days are in a leap year?"]
    outputs = await asyncio.gather(*(
        planner.plan(q, "", cards, "(no steps yet)", turn=1, max_turns=3, seed=seed)
        for q in questions for seed in (1, 2)
    ))
    turns = [o.turn for o in outputs]
    schema = json.dumps(planner_schema([c["name"] for c in cards]))
    assert all(t.json_schema == schema and t.response_ids for t in turns)
    assert any(o.generation.finish_reason == "stop" for o in outputs)  # some end at the stop token

    learner = Learner(LearnerConfig(model_path=str(model_dir), kl_beta=0.0, dtype="float32",
                                    temperature=temperature, lr=1e-6))
    try:
        trajectories = [
            Trajectory(question=q, question_id=q, planner_turns=[turn], reward=float(k % 2))
            for (q, k), turn in zip(((q, k) for q in questions for k in range(2)), turns, strict=True)
        ]
        batch = prepare_batch(trajectories, AdvantageMode.TRAJECTORY, 1e-6, True, True)
        samples = [s for update in batch.updates for s in update]
        assert len(samples) == len(turns) and all(s.json_schema == schema for s in samples)
        old = torch.cat(learner._score(samples))  # the learner's scoring path: masked
        unmasked = torch.cat([learner.log_probs(t.prompt_ids, t.response_ids) for t in turns])
        behaviour = torch.tensor([lp for t in turns for lp in t.logprobs])

        diff = (old - behaviour).abs()
        weights = torch.exp(old - behaviour)
        biased = torch.exp(unmasked - behaviour)
        print(f"planner turns under the schema, {diff.numel()} tokens: masked |old - behaviour| max "
              f"{diff.max().item():.2e}, mean {diff.mean().item():.2e}; importance weight mean "
              f"{weights.mean().item():.6f}; unmasked: weight mean {biased.mean().item():.4f}, "
              f"min {biased.min().item():.4f}, max |diff| {(unmasked - behaviour).abs().max().item():.3f}")
        assert diff.numel() > 100
        assert diff.max().item() < 1e-3
        assert abs(weights.mean().item() - 1.0) < 1e-3
        assert biased.mean().item() < 1.0 - 1e-3  # the bias the mask removes

        # One Flow-GRPO step on these fresh samples: its truncated importance weights average 1.
        metrics = learner.step(trajectories)
        print(f"step: tis_weight_mean {metrics['tis_weight_mean']:.6f}, "
              f"behaviour_approx_kl {metrics['behaviour_approx_kl']:.2e}")
        assert abs(metrics["tis_weight_mean"] - 1.0) < 1e-3
    finally:
        learner.close()
