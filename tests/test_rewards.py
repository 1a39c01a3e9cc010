"""Rewards: exact values for each checker, the Game-of-24 validator's every refusal, answer extraction."""

from __future__ import annotations

from collections.abc import Iterable

import pytest
import torch

from flowlane.api.errors import ConfigError
from flowlane.kit.tasks import Task
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings
from flowlane.runtime.rewards import (
    LLMJudge,
    RewardKind,
    ascore,
    check_game24,
    extract_final_answer,
    game24_numbers,
    normalize_answer,
    parse_number,
    reward_kinds,
    score,
)


def task(answer: str, question: str = "q?", **meta: object) -> Task:
    return Task("t-1", question, answer, "test", meta=dict(meta))


GAME = task("(8 / (3 - 8 / 3))", "Use the numbers 3, 3, 8, 8 to make 24.", numbers=[3, 3, 8, 8])


# -- answer extraction -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("Let me think... Answer: Brimford", "Brimford"),
        ("Final answer: 42\nThanks", "42"),
        ("so the result is \\boxed{\\frac{1}{2}} overall", "\\frac{1}{2}"),
        ("The answer is 1,234.", "1,234."),
        ("Answer: 5. Wait, no. The answer is 7.", "7."),
        ("  plain text  ", "plain text"),
    ],
)
def test_extract_final_answer(text: str, expected: str) -> None:
    assert extract_final_answer(text) == expected


def test_normalize_answer_drops_case_punctuation_articles_and_spaces() -> None:
    assert normalize_answer("  The  River,  Sallow! ") == "river sallow"


@pytest.mark.parametrize(
    ("text", "last", "expected"),
    [("The answer is 1,234.", False, 1234.0), ("-3.5 then 7", False, -3.5), ("1 then 2 then 3", True, 3.0),
     ("no digits", False, None), ("1e3", False, 1000.0)],
)  # fmt: skip
def test_parse_number(text: str, last: bool, expected: float | None) -> None:
    assert parse_number(text, last=last) == expected


# -- exact_match / numeric / choice ------------------------------------------------------------


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [("Answer: the Calloway Reach.", 1.0), ("calloway reach", 1.0), ("Answer: Calloway", 0.0), ("", 0.0)],
)
def test_exact_match(prediction: str, expected: float) -> None:
    assert score("exact_match", prediction, task("Calloway Reach")) == expected


@pytest.mark.parametrize(
    ("prediction", "expected"),
    [
        ("The answer is 1,234.", 1.0),
        ("Answer: 1234 (because 617 * 2)", 1.0),  # first number after the marker
        ("617 * 2 = 1234", 1.0),  # no marker: the last number
        ("Answer: 1235", 0.0),
        ("I do not know", 0.0),
        ("Answer: 1234.0000000001", 1.0),  # within the relative tolerance
    ],
)
def test_numeric(prediction: str, expected: float) -> None:
    assert score("numeric", prediction, task("1234")) == expected


def test_numeric_falls_back_to_exact_match_for_a_non_numeric_gold() -> None:
    assert score("numeric", "Answer: Tessabrook", task("Tessabrook")) == 1.0


@pytest.mark.parametrize(("prediction", "expected"), [("Answer: (B)", 1.0), ("b) because...", 1.0), ("C", 0.0)])
def test_choice(prediction: str, expected: float) -> None:
    assert score("choice", prediction, task("B")) == expected


def test_reward_aliases_from_the_flowrun_api_resolve() -> None:
    assert score("exact", "Answer: x", task("x")) == 1.0


def test_unknown_reward_names_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown reward 'fuzzy'; available: exact, numeric, choice, game24"):
        score("fuzzy", "x", task("x"))


def test_reward_kinds_lists_the_registry() -> None:
    assert reward_kinds() == ["exact", "numeric", "choice", "game24", "judge"]


# -- game24 ------------------------------------------------------------------------------------


def test_game24_accepts_a_valid_expression() -> None:
    assert check_game24("8 / (3 - 8 / 3)", [3, 3, 8, 8]) == (True, "ok")


def test_game24_accepts_unicode_operators_and_a_trailing_equals_24() -> None:
    assert check_game24("(8 ÷ (3 − 8 ÷ 3)) = 24", [3, 3, 8, 8]) == (True, "ok")


def test_game24_rejects_a_wrong_value() -> None:
    assert check_game24("3 + 3 + 8 + 8", [3, 3, 8, 8]) == (False, "evaluates to 22, not 24")


def test_game24_rejects_other_numbers() -> None:
    assert check_game24("4 * 6", [3, 3, 8, 8]) == (False, "uses [4, 6], must use each of [3, 3, 8, 8] exactly once")


def test_game24_rejects_a_reused_number() -> None:
    ok, why = check_game24("8 * 3 * (8 / 8)", [3, 3, 8, 8])
    assert (ok, why) == (False, "uses [3, 8, 8, 8], must use each of [3, 3, 8, 8] exactly once")


def test_game24_rejects_division_by_zero() -> None:
    assert check_game24("8 / (3 - 3) + 8", [3, 3, 8, 8]) == (False, "division by zero")


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("__import__('os').system('true')", "Call is not allowed (only numbers, + - * / and parentheses)"),
        ("(lambda: 24)()", "Call is not allowed (only numbers, + - * / and parentheses)"),
        ("2 ** 3 * (4 - 1)", "operator Pow is not allowed (only + - * /)"),
        ("-1 + 3 * (2 * 4 + 1)", "UnaryOp is not allowed (only numbers, + - * / and parentheses)"),
        ("2.0 * 3 * 4 * 1", "Constant is not allowed (only numbers, + - * / and parentheses)"),
        ("(1 + 2) * (3 +", "not an arithmetic expression"),
    ],
)
def test_game24_rejects_anything_but_plain_arithmetic(expression: str, why: str) -> None:
    assert check_game24(expression, [1, 2, 3, 4]) == (False, why)


def test_game24_never_raises_on_garbage() -> None:
    for garbage in ["", "(((", "8 / (3 - 8 / 3", "x" * 10_000, "(" * 150 + "3" + ")" * 150, "\x00"]:
        assert check_game24(garbage, [3, 3, 8, 8])[0] is False


def test_game24_reward_reads_the_numbers_from_meta_or_the_question() -> None:
    assert score("game24", "Answer: 8 / (3 - 8 / 3)", GAME) == 1.0
    bare = Task("t", GAME.question, GAME.answer, "game24")  # a gRPC task carries no meta
    assert score("game24", "Answer: 8 / (3 - 8 / 3)", bare) == 1.0
    assert score("game24", "Answer: 3 * 8 + 8 - 8", bare) == 0.0


def test_game24_numbers_parses_the_bundled_question_format() -> None:
    assert game24_numbers("Use the numbers 2, 3, 13, 13 to make 24.") == [2, 3, 13, 13]


# -- llm_judge ---------------------------------------------------------------------------------


class ScriptedJudge(LLMEngine):
    """Replies with a fixed text and records what it was asked."""

    name = "scripted"

    def __init__(self, reply: str, structured: bool = False) -> None:
        super().__init__()
        self.reply = reply
        self.supports_structured_output = structured
        self.requests: list[tuple[list[dict[str, str]], SamplingSettings]] = []

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        self.requests.append((messages, settings))
        return Generation([], [], [], self.reply)

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        raise NotImplementedError


@pytest.mark.parametrize(
    ("reply", "expected"),
    [("CORRECT", 1.0), ("correct.", 1.0), ('{"verdict": "CORRECT"}', 1.0), ("INCORRECT", 0.0), ("maybe", 0.0)],
)
async def test_llm_judge_reads_the_verdict(reply: str, expected: float) -> None:
    judge = LLMJudge(ScriptedJudge(reply))
    assert await ascore("llm_judge", "Answer: Paris", task("Paris", "Capital of France?"), judge=judge) == expected


async def test_llm_judge_asks_for_a_schema_when_the_engine_enforces_one() -> None:
    engine = ScriptedJudge('{"verdict": "CORRECT"}', structured=True)
    await LLMJudge(engine)("Answer: Paris", task("Paris"))
    messages, settings = engine.requests[0]
    assert settings.json_schema is not None and settings.temperature == 0.0
    assert "Reference answer: Paris" in messages[1]["content"]


def test_llm_judge_is_refused_by_the_sync_score() -> None:
    with pytest.raises(ConfigError, match="needs a judge model"):
        score(RewardKind.JUDGE, "x", task("x"))


def test_a_rollout_worker_scores_an_unscorable_task_zero_instead_of_crashing(caplog: pytest.LogCaptureFixture) -> None:
    # reward judge never reaches a worker (the spec and the learner refuse it); if one does, the
    # worker logs it and goes on: its trajectory gets reward 0 and the other tasks are scored.
    import asyncio
    from types import SimpleNamespace

    from flowlane.api.trajectory import Trajectory
    from flowlane.runtime.rollout.worker import RolloutWorker, WorkerStats

    class Agent:
        async def run(self, question: str, question_id: str, gold_answer: str, seed: int) -> Trajectory:
            return Trajectory(question=question, question_id=question_id, answer="4")

    def unit(kind: str, n: int) -> SimpleNamespace:
        return SimpleNamespace(eval=False, question="2 + 2?", question_id=f"q{n}", answer="4", seed=0,
                               reward_kind=kind, unit_id=f"u{n}", meta={})

    worker = SimpleNamespace(worker_id="rollout-0/x", stats=WorkerStats())
    records = asyncio.run(RolloutWorker._roll_out(worker, {False: Agent()},  # type: ignore[arg-type]
                                                  [unit("judge", 0), unit("numeric", 1)], 0))
    assert [r.reward for r in records] == [0.0, 1.0]
    assert "task q0 cannot be scored (reward 'judge' needs a judge model" in caplog.text


def test_flowlane_eval_refuses_judge_rows_before_starting_an_engine(tmp_path) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import json

    from flowlane.runtime.evaluate import evaluate

    rows = [{"question": "2 + 2?", "answer": "4", "source": "mine", "reward": "llm_judge"}]
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(ConfigError, match=r"1 tasks \(e.g. qa-00000\) are scored with reward judge"):
        asyncio.run(evaluate("no-such-model", str(path), "all", engine_kind="transformers"))
