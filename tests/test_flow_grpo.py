"""Flow-GRPO math: hand-computed values on tiny tensors, and slow loop references on random ones."""

from __future__ import annotations

import math
import random

import pytest
import torch

from flowlane.api.errors import ConfigError
from flowlane.trainer import flow_grpo
from flowlane.trainer.flow_grpo import (
    advantage_stats,
    aggregate,
    approx_kl,
    clip_fractions,
    clipped_policy_loss,
    entropy_from_logits,
    kl_k1,
    kl_k3,
    paper_weights,
    token_mean_weights,
    trajectory_advantages,
    truncated_importance_weights,
    turn_advantages,
    uniform_groups,
)

EPS = 1e-6


def close(actual: torch.Tensor, expected: list[float], tol: float = 1e-5) -> None:
    torch.testing.assert_close(actual.double(), torch.tensor(expected, dtype=torch.float64), atol=tol, rtol=0)


# --- advantages: hand-computed -------------------------------------------------------------------

# Two questions. Question 0: four trajectories with rewards 1, 0, 0, 1 and 1, 2, 1, 3 planner turns.
# Question 1: two trajectories with rewards 1, 0 and one turn each.
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1])
TURNS = torch.tensor([1, 2, 1, 3, 1, 1])


def test_trajectory_advantages_normalise_over_the_trajectories_of_a_question() -> None:
    # Question 0: mean 0.5; sample std = sqrt((4 * 0.25) / 3) = 0.577350; A = +-0.5 / 0.577350 = +-0.866025.
    # Question 1: mean 0.5; sample std = sqrt((2 * 0.25) / 1) = 0.707107; A = +-0.5 / 0.707107 = +-0.707107.
    advantages = trajectory_advantages(REWARDS, GROUPS, TURNS, EPS, True)
    a0 = 0.5 / (math.sqrt(1 / 3) + EPS)
    a1 = 0.5 / (math.sqrt(0.5) + EPS)
    close(advantages, [a0, -a0, -a0, a0, a1, -a1])


def test_turn_advantages_normalise_over_the_turn_samples_of_a_question() -> None:
    # Question 0 expands to 7 turn samples: [1] + [0, 0] + [0] + [1, 1, 1].
    # mean = 4/7; squared deviations: 4 * (3/7)^2 + 3 * (4/7)^2 = 84/49; sample var = (84/49) / 6 = 2/7.
    # A(reward 1) = (3/7) / sqrt(2/7) = 0.801784;  A(reward 0) = (-4/7) / sqrt(2/7) = -1.069045.
    # Question 1 has one turn per trajectory, so it equals the trajectory mode: +-0.707107.
    advantages = turn_advantages(REWARDS, GROUPS, TURNS, EPS, True)
    std = math.sqrt(2 / 7) + EPS
    a1 = 0.5 / (math.sqrt(0.5) + EPS)
    close(advantages, [(3 / 7) / std, (-4 / 7) / std, (-4 / 7) / std, (3 / 7) / std, a1, -a1])


def test_advantages_without_std_normalisation_are_mean_centred_rewards() -> None:
    # trajectory: R - 0.5 everywhere; turn: question 0 centred on 4/7, question 1 on 0.5.
    close(trajectory_advantages(REWARDS, GROUPS, TURNS, EPS, False), [0.5, -0.5, -0.5, 0.5, 0.5, -0.5])
    close(turn_advantages(REWARDS, GROUPS, TURNS, EPS, False), [3 / 7, -4 / 7, -4 / 7, 3 / 7, 0.5, -0.5])


def test_uniform_groups_and_single_samples_get_zero_advantage_and_are_flagged() -> None:
    rewards = torch.tensor([1.0, 1.0, 1.0, 0.0, 0.0, 0.7, 0.0, 1.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 2, 3, 3])
    turns = torch.tensor([1, 2, 3, 1, 1, 2, 1, 1])
    for mode in flow_grpo.AdvantageMode:
        advantages = flow_grpo.ADVANTAGE_ESTIMATORS[mode](rewards, groups, turns, EPS, True)
        close(advantages[:6], [0.0] * 6)
    assert uniform_groups(rewards, groups).tolist() == [True, True, True, False]


# --- aggregation weights and the clipped loss: hand-computed -------------------------------------

# Three turns: turn 0 (2 tokens) and turn 1 (1 token) of trajectory 0, turn 2 (1 token) of trajectory 1.
TOKEN_TURN = torch.tensor([0, 0, 1, 2])
TURN_TRAJECTORY = torch.tensor([0, 0, 1])


def test_paper_weights_average_tokens_then_turns_then_trajectories() -> None:
    # w = 1 / (|a_it| * T_i * N) with N = 2 trajectories:
    # turn 0: 1 / (2 * 2 * 2) = 0.125; turn 1: 1 / (1 * 2 * 2) = 0.25; turn 2: 1 / (1 * 1 * 2) = 0.5.
    close(paper_weights(TOKEN_TURN, TURN_TRAJECTORY), [0.125, 0.125, 0.25, 0.5])


def test_token_mean_weights_count_every_token_once() -> None:
    close(token_mean_weights(TOKEN_TURN, TURN_TRAJECTORY), [0.25] * 4)


def test_paper_weights_ignore_turns_without_tokens() -> None:
    # Turn 1 of trajectory 0 has no tokens: T_0 counts only turn 0, so turn 0's tokens weigh 1 / (2 * 1 * 2).
    weights = paper_weights(torch.tensor([0, 0, 2]), torch.tensor([0, 0, 1]))
    close(weights, [0.25, 0.25, 0.5])


# Four tokens with ratios 1.5, 0.5, 1.1, 0.7 and advantages +1, -1, -1, +1; eps_low 0.2, eps_high 0.3:
#   token 0: min(1.5 * 1, 1.3 * 1) = 1.3            -> loss -1.3, clipped high
#   token 1: min(0.5 * -1, 0.8 * -1) = -0.8         -> loss  0.8, clipped low
#   token 2: min(1.1 * -1, 1.1 * -1) = -1.1         -> loss  1.1, inside the range
#   token 3: min(0.7 * 1, 0.8 * 1) = 0.7            -> loss -0.7, below 1 - eps_low but unclipped wins (A > 0)
RATIOS = torch.tensor([1.5, 0.5, 1.1, 0.7], dtype=torch.float64)
ADVANTAGES = torch.tensor([1.0, -1.0, -1.0, 1.0], dtype=torch.float64)


def _terms(importance: torch.Tensor | None = None) -> flow_grpo.PolicyLossTerms:
    log_prob = torch.log(RATIOS)
    return clipped_policy_loss(log_prob, torch.zeros(4, dtype=torch.float64), ADVANTAGES, 0.2, 0.3, importance)


def test_clipped_loss_per_token_uses_separate_low_and_high_clip() -> None:
    terms = _terms()
    close(terms.loss, [-1.3, 0.8, 1.1, -0.7])
    close(terms.ratio, [1.5, 0.5, 1.1, 0.7])
    assert terms.clipped_low.tolist() == [False, True, False, False]
    assert terms.clipped_high.tolist() == [True, False, False, False]
    assert clip_fractions(terms.clipped_low, terms.clipped_high) == (0.25, 0.25)


def test_clipped_loss_with_paper_aggregation() -> None:
    # (-1.3 + 0.8) * 0.125 + 1.1 * 0.25 + (-0.7) * 0.5 = -0.0625 + 0.275 - 0.35 = -0.1375
    loss = aggregate(_terms().loss, paper_weights(TOKEN_TURN, TURN_TRAJECTORY))
    assert loss.item() == pytest.approx(-0.1375, abs=1e-6)


def test_clipped_loss_with_token_mean_aggregation() -> None:
    # (-1.3 + 0.8 + 1.1 - 0.7) / 4 = -0.025
    loss = aggregate(_terms().loss, token_mean_weights(TOKEN_TURN, TURN_TRAJECTORY))
    assert loss.item() == pytest.approx(-0.025, abs=1e-6)


def test_clipped_tokens_get_no_gradient() -> None:
    # d(-r A)/d logp = -r A for unclipped tokens: token 2 -> 1.1, token 3 -> -0.7; clipped tokens -> 0.
    log_prob = torch.log(RATIOS).requires_grad_(True)
    terms = clipped_policy_loss(log_prob, torch.zeros(4, dtype=torch.float64), ADVANTAGES, 0.2, 0.3)
    terms.loss.sum().backward()
    assert log_prob.grad is not None
    close(log_prob.grad, [0.0, 0.0, 1.1, -0.7])


@pytest.mark.parametrize("with_importance", [False, True])
def test_the_clipped_terms_carry_exactly_zero_gradient(with_importance: bool) -> None:
    # Many tokens, ratios spread well beyond both clip edges, weighted as the learner weights them:
    # every token whose clipped term is active gets a gradient of exactly 0 (not merely small), and
    # every other token a non-zero one.
    generator = torch.Generator().manual_seed(0)
    n = 400
    old = -torch.rand(n, generator=generator, dtype=torch.float64) * 4
    log_prob = (old + torch.randn(n, generator=generator, dtype=torch.float64) * 0.5).requires_grad_(True)
    advantages = torch.randn(n, generator=generator, dtype=torch.float64)
    importance = torch.rand(n, generator=generator, dtype=torch.float64) + 0.5 if with_importance else None
    terms = clipped_policy_loss(log_prob, old, advantages, 0.2, 0.3, importance)
    clipped = terms.clipped_low | terms.clipped_high
    assert 0.1 < clipped.double().mean().item() < 0.9  # both kinds of token are well represented
    assert terms.clipped_low.any() and terms.clipped_high.any()
    weights = torch.rand(n, generator=generator, dtype=torch.float32) + 0.1
    (grad,) = torch.autograd.grad(aggregate(terms.loss, weights), log_prob, retain_graph=True)
    assert torch.equal(grad[clipped], torch.zeros_like(grad[clipped]))
    assert (grad[~clipped] != 0).all()
    # the loss of the clipped tokens alone is a constant of log_prob
    (clipped_grad,) = torch.autograd.grad(terms.loss[clipped].sum(), log_prob)
    assert torch.count_nonzero(clipped_grad) == 0


def test_importance_weights_scale_the_loss_without_gradient_through_them() -> None:
    weights = torch.tensor([2.0, 0.5, 1.0, 0.25], dtype=torch.float64, requires_grad=True)
    terms = _terms(weights)
    # [-1.3 * 2, 0.8 * 0.5, 1.1 * 1, -0.7 * 0.25]
    close(terms.loss, [-2.6, 0.4, 1.1, -0.175])
    assert not terms.loss.requires_grad


def test_truncated_importance_weights_cap_the_ratio_to_the_behaviour_policy() -> None:
    # exp(old - behaviour) = [0.5, 1.5, 4.0, e^50] -> capped at 2: [0.5, 1.5, 2.0, 2.0]; e^1000 overflows, still 2.
    old = torch.log(torch.tensor([0.5, 1.5, 4.0, 1.0, 1.0], dtype=torch.float64))
    behaviour = torch.tensor([0.0, 0.0, 0.0, -50.0, -1000.0], dtype=torch.float64)
    close(truncated_importance_weights(old, behaviour, cap=2.0), [0.5, 1.5, 2.0, 2.0, 2.0])


def test_truncated_importance_weights_reject_a_non_positive_cap() -> None:
    with pytest.raises(ValueError, match="cap must be > 0"):
        truncated_importance_weights(torch.zeros(1), torch.zeros(1), cap=0.0)


# --- KL and diagnostics: hand-computed ----------------------------------------------------------


def test_k1_and_k3_estimators() -> None:
    # pi = 0.5, ref = 0.25: k1 = log 2 = 0.693147; k3 = 0.5 - log 0.5 - 1 = 0.193147.
    # pi = 0.25, ref = 0.5: k1 = -log 2 = -0.693147; k3 = 2 - log 2 - 1 = 0.306853.
    # pi = ref: both 0.
    log_prob = torch.log(torch.tensor([0.5, 0.25, 0.3], dtype=torch.float64))
    ref = torch.log(torch.tensor([0.25, 0.5, 0.3], dtype=torch.float64))
    close(kl_k1(log_prob, ref), [math.log(2), -math.log(2), 0.0])
    close(kl_k3(log_prob, ref), [0.5 - math.log(0.5) - 1, 2 - math.log(2) - 1, 0.0])


def test_k3_is_non_negative_and_finite_for_extreme_log_ratios() -> None:
    log_prob = torch.tensor([0.0, -100.0, -1e4])
    ref = torch.tensor([-1e4, 0.0, 0.0])
    values = kl_k3(log_prob, ref)
    assert torch.isfinite(values).all() and (values >= 0).all()


def test_approx_kl_between_old_and_new_policy() -> None:
    # r = 2 on both tokens: (2 - 1) - log 2 = 0.306853.
    assert approx_kl(torch.log(torch.tensor([0.5, 0.2])), torch.log(torch.tensor([0.25, 0.1]))) == pytest.approx(
        1 - math.log(2), abs=1e-6
    )


def test_entropy_from_logits() -> None:
    # uniform over 4: log 4 = 1.386294; probs (0.5, 0.25, 0.25): 0.5 log 2 + 2 * 0.25 log 4 = 1.039721.
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(0.5), math.log(0.25), math.log(0.25), -math.inf]])
    close(entropy_from_logits(logits), [math.log(4), 0.5 * math.log(2) + 0.5 * math.log(4)])


def test_advantage_stats() -> None:
    stats = advantage_stats(torch.tensor([-1.0, 0.0, 1.0, 2.0]))
    # mean 0.5; deviations -1.5, -0.5, 0.5, 1.5 -> var (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    assert stats == pytest.approx({"mean": 0.5, "std": math.sqrt(1.25), "min": -1.0, "max": 2.0})
    assert advantage_stats(torch.zeros(0)) == {"mean": 0.0, "std": 0.0, "min": 0.0, "max": 0.0}


# --- registries ---------------------------------------------------------------------------------


def test_registries_select_functions_by_name() -> None:
    assert flow_grpo.get_advantage_estimator("trajectory") is trajectory_advantages
    assert flow_grpo.get_advantage_estimator("turn") is turn_advantages
    assert flow_grpo.get_aggregation("paper") is paper_weights
    assert flow_grpo.get_aggregation("tokenMean") is token_mean_weights
    assert flow_grpo.get_aggregation("token_mean") is token_mean_weights  # the spelling older configs use
    assert flow_grpo.get_kl_estimator("k1") is kl_k1
    assert flow_grpo.get_kl_estimator("k3") is kl_k3


def test_unknown_registry_name_is_a_config_error_listing_the_choices() -> None:
    with pytest.raises(ConfigError, match=r"unknown KL estimator 'k2'; choose one of: k1, k3"):
        flow_grpo.get_kl_estimator("k2")
    with pytest.raises(ConfigError, match="paper, tokenMean"):
        flow_grpo.get_aggregation("seq_mean")


# --- slow loop references on random inputs -------------------------------------------------------


def _random_batch(seed: int) -> dict[str, object]:
    """Random questions -> trajectories -> turns -> tokens, as nested Python lists."""
    rng = random.Random(seed)
    questions = []
    for _ in range(rng.randint(2, 5)):
        trajectories = []
        for _ in range(rng.randint(1, 6)):
            turns = [rng.randint(1, 7) for _ in range(rng.randint(1, 4))]  # tokens per turn
            trajectories.append({"reward": float(rng.choice([0, 1, 1, 0.5])), "turns": turns})
        questions.append(trajectories)
    return {"questions": questions}


def _loop_advantages(questions: list[list[dict]], per_turn: bool, normalize: bool) -> list[float]:
    result = []
    for trajectories in questions:
        samples = []
        for t in trajectories:
            samples.extend([t["reward"]] * (len(t["turns"]) if per_turn else 1))
        mean = sum(samples) / len(samples)
        var = sum((x - mean) ** 2 for x in samples) / (len(samples) - 1) if len(samples) > 1 else 0.0
        for t in trajectories:
            centred = t["reward"] - mean
            result.append(centred / (math.sqrt(var) + EPS) if normalize else centred)
    return result


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("mode", list(flow_grpo.AdvantageMode))
@pytest.mark.parametrize("normalize", [True, False])
def test_advantages_match_loop_reference(seed: int, mode: flow_grpo.AdvantageMode, normalize: bool) -> None:
    questions = _random_batch(seed)["questions"]
    assert isinstance(questions, list)
    rewards = torch.tensor([t["reward"] for q in questions for t in q])
    groups = torch.tensor([g for g, q in enumerate(questions) for _ in q])
    turns = torch.tensor([len(t["turns"]) for q in questions for t in q])
    advantages = flow_grpo.ADVANTAGE_ESTIMATORS[mode](rewards, groups, turns, EPS, normalize)
    expected = _loop_advantages(questions, mode == flow_grpo.AdvantageMode.TURN, normalize)
    close(advantages, expected, tol=1e-5)


def _loop_loss(
    trajectories: list[list[list[dict[str, float]]]],
    eps_low: float,
    eps_high: float,
    beta: float,
    paper: bool,
) -> float:
    """Direct transcription of J: per trajectory, per turn, per token (each token a dict of floats)."""

    def token_objective(tok: dict[str, float]) -> float:
        ratio = math.exp(tok["logp"] - tok["old"])
        clipped = min(max(ratio, 1 - eps_low), 1 + eps_high)
        weight = min(math.exp(tok["old"] - tok["behaviour"]), 2.0)
        surrogate = weight * min(ratio * tok["adv"], clipped * tok["adv"])
        d = tok["ref"] - tok["logp"]
        kl = math.exp(d) - d - 1
        return -surrogate + beta * kl

    if paper:
        total = 0.0
        for turns in trajectories:
            per_turn = [sum(token_objective(t) for t in tokens) / len(tokens) for tokens in turns]
            total += sum(per_turn) / len(per_turn)
        return total / len(trajectories)
    all_tokens = [t for turns in trajectories for tokens in turns for t in tokens]
    return sum(token_objective(t) for t in all_tokens) / len(all_tokens)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("aggregation", list(flow_grpo.Aggregation))
def test_full_loss_matches_loop_reference(seed: int, aggregation: flow_grpo.Aggregation) -> None:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    # trajectories -> turns -> tokens
    structure = [[rng.randint(1, 6) for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(2, 6))]
    token_turn, turn_trajectory = [], []
    turn_id = 0
    for i, turns in enumerate(structure):
        for n_tokens in turns:
            token_turn.extend([turn_id] * n_tokens)
            turn_trajectory.append(i)
            turn_id += 1
    n = len(token_turn)
    log_prob = -torch.rand(n, dtype=torch.float64) * 3
    old = log_prob + torch.randn(n, dtype=torch.float64) * 0.3
    behaviour = old + torch.randn(n, dtype=torch.float64) * 0.5
    ref = log_prob + torch.randn(n, dtype=torch.float64) * 0.2
    traj_adv = torch.randn(len(structure), dtype=torch.float64)
    turn_traj = torch.tensor(turn_trajectory)
    tok_turn = torch.tensor(token_turn)
    advantages = traj_adv[turn_traj[tok_turn]]

    weights = flow_grpo.AGGREGATIONS[aggregation](tok_turn, turn_traj).double()
    importance = truncated_importance_weights(old, behaviour, 2.0)
    terms = clipped_policy_loss(log_prob, old, advantages, 0.2, 0.3, importance)
    loss = aggregate(terms.loss, weights) + 0.05 * aggregate(kl_k3(log_prob, ref), weights)

    nested: list[list[list[dict[str, float]]]] = []
    k = 0
    for i, turns in enumerate(structure):
        nested.append([])
        for n_tokens in turns:
            tokens = []
            for _ in range(n_tokens):
                tokens.append(
                    {
                        "logp": float(log_prob[k]),
                        "old": float(old[k]),
                        "behaviour": float(behaviour[k]),
                        "ref": float(ref[k]),
                        "adv": float(traj_adv[i]),
                    }
                )
                k += 1
            nested[-1].append(tokens)
    expected = _loop_loss(nested, 0.2, 0.3, 0.05, aggregation == flow_grpo.Aggregation.PAPER)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
