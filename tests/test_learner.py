"""The learner engine: batching, update direction, uniform groups, packing equivalence, LoRA, checkpoints.

Where the real weights matter (does a rewarded turn become more likely?) the bundled
SmolLM2-135M-Instruct is used; elsewhere a tiny random model of the same architecture keeps each
test at a few seconds.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from learner_helpers import TINY_VOCAB, make_tiny_model_dir, synthetic_trajectories

from flowlane.api.errors import ConfigError, FlowlaneError
from flowlane.api.trajectory import PlannerTurn, Trajectory
from flowlane.trainer.batching import (
    BatchLayout,
    pack_sequences,
    pad_sequences,
    plan_micro_batches,
    plan_sequences,
    share_prefixes,
)
from flowlane.trainer.flow_grpo import AdvantageMode, Aggregation
from flowlane.trainer.learner import Learner
from flowlane.trainer.learner_batch import prepare_batch, token_weights
from flowlane.trainer.learner_config import LearnerConfig, LoraSettings, LRSchedule, lr_factor


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """One intra-op thread: on a shared 2-core machine two spinning OpenMP threads wait on each
    other (measured: a tiny-model step 30x slower, a 135M step 6x slower under load)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-model"), seed=0)


@pytest.fixture
def make_learner(tiny_model: Path) -> Iterator:
    """Build learners on the tiny model (closed after the test); keyword arguments go to LearnerConfig."""
    built: list[Learner] = []

    def build(**overrides: object) -> Learner:
        settings: dict[str, object] = {"model_path": str(tiny_model), "lr": 1e-2, "dtype": "float32"}
        settings.update(overrides)
        learner = Learner(LearnerConfig(**settings))
        built.append(learner)
        return learner

    yield build
    for learner in built:
        learner.close()


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return {name: tensor.clone() for name, tensor in learner.export_weights()}


# --- pure pieces -----------------------------------------------------------------------------------


LENGTH_LAYOUTS = [BatchLayout.PADDED, BatchLayout.PACKED]


@pytest.mark.parametrize("layout", LENGTH_LAYOUTS)
def test_micro_batches_stay_within_the_token_budget_and_cover_every_sequence(layout: BatchLayout) -> None:
    lengths = [7, 3, 9, 2, 5, 5, 1, 8]
    plan = plan_micro_batches(lengths, 10, layout)
    assert sorted(i for batch in plan for i in batch) == list(range(len(lengths)))
    if layout == BatchLayout.PACKED:  # total length
        assert all(sum(lengths[i] for i in batch) <= 10 for batch in plan)
    else:  # rows * longest row, i.e. counting the padding
        assert all(len(batch) * max(lengths[i] for i in batch) <= 10 for batch in plan)


def test_packed_plan_is_first_fit_decreasing() -> None:
    # 9+1, 8+2, 7+3, 5+5
    assert plan_micro_batches([7, 3, 9, 2, 5, 5, 1, 8], 10, BatchLayout.PACKED) == [[2, 6], [7, 3], [0, 1], [4, 5]]


def test_padded_plan_groups_similar_lengths_longest_first() -> None:
    # sorted: 9, 8, 7, 5, 5, 3, 2, 1 -> [9], [8], [7], [5, 5], [3, 2, 1] (3 rows * 3 <= 10)
    assert plan_micro_batches([7, 3, 9, 2, 5, 5, 1, 8], 10, BatchLayout.PADDED) == [[2], [7], [0], [4, 5], [1, 3, 6]]


@pytest.mark.parametrize("layout", list(BatchLayout))
def test_a_sequence_longer_than_the_budget_gets_its_own_micro_batch(layout: BatchLayout) -> None:
    sequences = [([1] * 11, [2]), ([3, 4], [5]), ([6, 7, 8], [9])]
    plan = plan_sequences(sequences, 10, layout)
    assert [0] in plan and sorted(i for batch in plan for i in batch) == [0, 1, 2]


def test_shared_plan_counts_prefix_tree_nodes_in_lexicographic_order() -> None:
    # sorted: [1,2,3,4] (4 nodes), [1,2,3,5] (+1), [1,2,9] (+1) = 6; [7,8,9] (+3) = 9; [7,8,9,9,9] (+2) > 10
    sequences = [([7, 8], [9]), ([1, 2, 3], [5]), ([1, 2], [9]), ([1, 2, 3], [4]), ([7, 8, 9, 9], [9])]
    assert plan_sequences(sequences, 10, BatchLayout.SHARED) == [[3, 1, 2, 0], [4]]
    with pytest.raises(ValueError, match="plan_sequences"):
        plan_micro_batches([1, 2], 10, BatchLayout.SHARED)


def test_shared_prefixes_run_once_and_each_token_attends_to_its_own_ancestors() -> None:
    # prompts [5, 6, 7] and [5, 6, 8] share [5, 6]; responses [1, 2] and [1]
    batch = share_prefixes([([5, 6, 7], [1, 2]), ([5, 6, 8], [1])])
    assert batch.input_ids.tolist() == [[5, 6, 7, 1, 2, 8, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 2, 3]]
    assert batch.attention_mask is not None
    assert batch.attention_mask[0, 0].int().tolist() == [
        [1, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 0, 1, 0],
        [1, 1, 0, 0, 0, 1, 1],
    ]
    # sequence 0 is scored at nodes 2 (predicts 1) and 3 (predicts 2); sequence 1 at node 5 (predicts 1)
    assert batch.logits_to_keep.tolist() == [2, 3, 5]  # type: ignore[union-attr]
    assert batch.logit_index.tolist() == [0, 1, 2]
    assert batch.target_ids.tolist() == [1, 2, 1] and batch.token_sequence.tolist() == [0, 0, 1]
    assert batch.real_tokens == 9 and batch.computed_tokens == 7
    # identical turns (a group's shared first turn with the same sampled plan) share every node
    twice = share_prefixes([([5, 6], [1]), ([5, 6], [1])])
    assert twice.input_ids.tolist() == [[5, 6, 1]] and twice.logit_index.tolist() == [0, 0]


def test_packing_restarts_positions_and_scores_response_tokens_from_the_previous_position() -> None:
    batch = pack_sequences([([10, 11], [12, 13]), ([20], [21])])
    assert batch.input_ids.tolist() == [[10, 11, 12, 13, 20, 21]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 0, 1]]
    assert batch.attention_mask is None
    # token 12 is predicted at position 1 (after 11), 13 at 2, 21 at 4 (after 20)
    assert isinstance(batch.logits_to_keep, torch.Tensor) and batch.logits_to_keep.tolist() == [1, 2, 4]
    assert batch.target_ids.tolist() == [12, 13, 21]
    assert batch.token_sequence.tolist() == [0, 0, 1]
    assert (batch.real_tokens, batch.computed_tokens) == (6, 6)


def test_padding_aligns_row_ends_and_scores_only_response_tokens() -> None:
    batch = pad_sequences([([10, 11], [12, 13]), ([20], [21])], pad_id=0)
    assert batch.input_ids.tolist() == [[10, 11, 12, 13], [0, 0, 20, 21]]
    assert batch.attention_mask is not None and batch.attention_mask.tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3], [0, 0, 0, 1]]
    # K = longest response + 1 = 3 kept columns (1, 2, 3) per row; flattened rows: 0-2 and 3-5.
    # row 0: 12 from column 1 (kept 0), 13 from column 2 (kept 1); row 1: 21 from column 2 (kept 4).
    assert batch.logits_to_keep == 3
    assert batch.logit_index.tolist() == [0, 1, 4]
    assert batch.target_ids.tolist() == [12, 13, 21]
    assert (batch.real_tokens, batch.computed_tokens) == (6, 8)


def _turn(n_response: int, version: int = 0) -> PlannerTurn:
    return PlannerTurn(
        prompt_ids=[1, 2], response_ids=[3] * n_response, logprobs=[-1.0] * n_response, policy_version=version
    )


def test_prepare_batch_broadcasts_the_trajectory_advantage_to_every_turn() -> None:
    trajectories = [
        Trajectory(question="a", question_id="a", planner_turns=[_turn(2), _turn(1)], reward=1.0),
        Trajectory(question="a", question_id="a", planner_turns=[_turn(3)], reward=0.0),
    ]
    batch = prepare_batch(trajectories, AdvantageMode.TRAJECTORY, 1e-6, True, True)
    # rewards 1, 0: mean 0.5, sample std 0.707107 -> A = +-0.707107, the same on both turns of trajectory 0
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert [s.advantage for s in batch.updates[0]] == pytest.approx([a, a, -a])
    assert [s.trajectory for s in batch.updates[0]] == [0, 0, 1]
    # paper weights: trajectory 0 turns 1/(2*2*2), 1/(1*2*2); trajectory 1: 1/(3*1*2)
    pieces = token_weights(batch.updates[0], Aggregation.PAPER)
    assert torch.cat(pieces).tolist() == pytest.approx([0.125, 0.125, 0.25, 1 / 6, 1 / 6, 1 / 6])


def test_prepare_batch_counts_and_skips_uniform_groups() -> None:
    trajectories = synthetic_trajectories(0, questions=3, group_size=2, rewards=[[1, 1], [0, 1], [0, 0]])
    batch = prepare_batch(trajectories, AdvantageMode.TRAJECTORY, 1e-6, True, skip_uniform_groups=True)
    assert (batch.groups, batch.groups_uniform, batch.groups_skipped, batch.trajectories) == (3, 2, 2, 2)
    kept = prepare_batch(trajectories, AdvantageMode.TRAJECTORY, 1e-6, True, skip_uniform_groups=False)
    assert (kept.groups_uniform, kept.groups_skipped, kept.trajectories) == (2, 0, 6)


def test_a_trajectory_without_reward_is_an_error() -> None:
    trajectory = Trajectory(question="a", question_id="a", planner_turns=[_turn(1)], reward=None)
    with pytest.raises(FlowlaneError, match="has no reward; score trajectories"):
        prepare_batch([trajectory], AdvantageMode.TRAJECTORY, 1e-6, True, True)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"clip_eps_low: must be in \[0, 1\), got 1.5"):
        LearnerConfig(model_path="m", clip_eps_low=1.5)
    with pytest.raises(ConfigError, match="aggregation: unknown value 'seq'; choose one of: paper, tokenMean"):
        LearnerConfig(model_path="m", aggregation="seq")
    with pytest.raises(ConfigError, match="dtype: float16 is not supported by the learner"):
        LearnerConfig(model_path="m", dtype="float16")
    with pytest.raises(ConfigError, match="total_steps: a cosine schedule needs total_steps > warmup_steps"):
        LearnerConfig(model_path="m", lr_schedule=LRSchedule.COSINE, warmup_steps=5, total_steps=5)
    with pytest.raises(ConfigError, match=r"lora.r: must be >= 1"):
        LearnerConfig(model_path="m", lora=LoraSettings(r=0))
    with pytest.raises(ConfigError, match=r"ppo_epochs: must be >= 1, got 0"):
        LearnerConfig(model_path="m", ppo_epochs=0)
    with pytest.raises(ConfigError, match=r"mini_batches_per_step: must be >= 1, got 0"):
        LearnerConfig(model_path="m", mini_batches_per_step=0)


def test_lr_schedule_warms_up_then_decays() -> None:
    # warmup 2: 1/2, 2/2; cosine over the 4 steps after it: 0.5 * (1 + cos(pi * k / 4)) with floor 0.1
    factors = [lr_factor(s, 2, 6, LRSchedule.COSINE, 0.1) for s in range(7)]
    cosine = [0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / 4)) for k in range(5)]
    assert factors == pytest.approx([0.5, 1.0, *cosine])
    assert [lr_factor(s, 0, 4, LRSchedule.LINEAR, 0.0) for s in range(5)] == pytest.approx([1, 0.75, 0.5, 0.25, 0])
    assert lr_factor(100, 0, 0, LRSchedule.CONSTANT, 0.0) == 1.0


# --- the real model: learning direction ----------------------------------------------------------


def test_positive_advantage_turn_gains_log_prob_and_negative_turn_loses_it(model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Which tool answers: what is 17 * 3?"}], tokenize=False, add_generation_prompt=True
    )
    prompt = tokenizer(text, add_special_tokens=False)["input_ids"]
    good = tokenizer("Tool Name: Python_Coder\nSub-Goal: compute 17 * 3", add_special_tokens=False)["input_ids"]
    bad = tokenizer("Tool Name: Wikipedia_Search\nSub-Goal: read about numbers", add_special_tokens=False)["input_ids"]
    learner = Learner(LearnerConfig(model_path=str(model_dir), lr=1e-5, kl_beta=0.0, dtype="float32"))
    try:
        good_before = learner.log_probs(prompt, good)
        bad_before = learner.log_probs(prompt, bad)
        trajectories = [
            Trajectory(
                question="q",
                question_id="q",
                reward=reward,
                planner_turns=[PlannerTurn(prompt, response, before.tolist(), policy_version=0)],
            )
            for reward, response, before in ((1.0, good, good_before), (0.0, bad, bad_before))
        ]
        metrics = learner.step(trajectories)
        good_after = learner.log_probs(prompt, good)
        bad_after = learner.log_probs(prompt, bad)
    finally:
        learner.close()
    assert metrics["updated"] == 1.0 and metrics["policy_version"] == 1.0
    assert good_after.sum() > good_before.sum() + 0.1
    assert bad_after.sum() < bad_before.sum() - 0.1


def test_a_second_ppo_epoch_clips_real_planner_turns(model_dir: Path) -> None:
    # Real planner turns of the bundled model, sampled on-policy (behaviour = the learner's own
    # log-probs): with ppoEpochs 2 the second pass is taken against the policy before the step, so
    # the first pass's move shows as ratios away from 1 and the clip range acts on some tokens.
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    questions = {"What is 17 * 3?": ("Tool Name: Python_Coder\nSub-Goal: compute 17 * 3",
                                     "Tool Name: Wikipedia_Search\nSub-Goal: read about numbers"),
                 "Who wrote Hamlet?": ("Tool Name: Wikipedia_Search\nSub-Goal: find the author of Hamlet",
                                       "Tool Name: Python_Coder\nSub-Goal: print('Hamlet')")}
    # the spec's default lr (algorithm.lr: 1e-5); measured: clip_frac_low 0.09, clip_frac_high 0.05
    learner = Learner(LearnerConfig(model_path=str(model_dir), lr=1e-5, kl_beta=0.0, dtype="float32",
                                    ppo_epochs=2))
    try:
        trajectories = []
        for question, responses in questions.items():
            prompt = ids(tokenizer.apply_chat_template([{"role": "user", "content": f"Which tool answers: {question}"}],
                                                       tokenize=False, add_generation_prompt=True))
            for reward, response in zip((1.0, 0.0), responses, strict=True):
                behaviour = learner.log_probs(prompt, ids(response)).tolist()
                turn = PlannerTurn(prompt, ids(response), behaviour, policy_version=0)
                trajectories.append(Trajectory(question=question, question_id=question, reward=reward,
                                               planner_turns=[turn]))
        metrics = learner.step(trajectories)
    finally:
        learner.close()
    assert metrics["optimizer_updates"] == 2.0 and metrics["policy_version"] == 1.0
    assert metrics["clip_frac_high"] > 0 and metrics["clip_frac_low"] > 0
    assert metrics["clip_frac"] == pytest.approx(metrics["clip_frac_low"] + metrics["clip_frac_high"])
    assert metrics["approx_kl"] > 0


# --- the tiny model: engine behaviour ------------------------------------------------------------


def test_uniform_groups_are_skipped_and_counted(make_learner) -> None:
    learner = make_learner()
    trajectories = synthetic_trajectories(1, questions=3, group_size=2, rewards=[[1, 1], [0, 1], [0, 0]])
    metrics = learner.step(trajectories)
    assert (metrics["groups"], metrics["groups_uniform"], metrics["groups_skipped"]) == (3.0, 2.0, 2.0)
    assert metrics["trajectories"] == 2.0
    assert metrics["turns"] == sum(len(t.planner_turns) for t in trajectories[2:4])


def test_a_batch_of_only_uniform_groups_changes_nothing(make_learner) -> None:
    learner = make_learner()
    before = weights(learner)
    metrics = learner.step(synthetic_trajectories(2, questions=2, group_size=3, rewards=[[1, 1, 1], [0, 0, 0]]))
    assert metrics["updated"] == 0.0 and metrics["groups_skipped"] == 2.0
    assert learner.policy_version == 0
    assert all(torch.equal(before[name], tensor) for name, tensor in learner.export_weights())


@pytest.mark.parametrize("layout", list(BatchLayout))
def test_micro_batches_give_the_loss_and_gradients_of_one_sample_at_a_time(make_learner, layout: BatchLayout) -> None:
    learner = make_learner(kl_beta=0.01, micro_batch_tokens=4096, batch_layout=layout)
    # Prompts share a system prefix and each group its first prompt, as real planner turns do.
    trajectories = synthetic_trajectories(3, questions=3, group_size=3, max_turns=3, system_tokens=6,
                                          shared_first_prompt=True)
    packed_loss, packed_grads = learner.compute_gradients(trajectories)
    learner.config.micro_batch_tokens = 1  # every turn alone in its micro-batch
    single_loss, single_grads = learner.compute_gradients(trajectories)
    assert packed_loss == pytest.approx(single_loss, abs=1e-6)
    assert packed_grads.keys() == single_grads.keys() and packed_grads
    for name, grad in packed_grads.items():
        torch.testing.assert_close(grad, single_grads[name], atol=1e-6, rtol=1e-4, msg=name)
    assert any(g.abs().max() > 1e-4 for g in packed_grads.values())


def test_stale_samples_report_staleness_and_cap_importance_weights(make_learner) -> None:
    learner = make_learner(tis_cap=2.0)
    learner.policy_version = 5
    trajectories = synthetic_trajectories(4, questions=2, group_size=2, policy_version=2, rewards=[[1, 0], [0, 1]])
    for trajectory in trajectories:  # the behaviour policy found every token very unlikely
        for turn in trajectory.planner_turns:
            turn.logprobs = [-30.0] * len(turn.response_ids)
    metrics = learner.step(trajectories)
    assert metrics["staleness_mean"] == 3.0 and metrics["staleness_max"] == 3.0
    assert metrics["tis_capped_frac"] == 1.0 and metrics["tis_weight_mean"] == pytest.approx(2.0)
    assert learner.policy_version == 6


def test_step_reports_the_metrics_tracking_needs(make_learner) -> None:
    learner = make_learner(kl_beta=0.1, warmup_steps=2)
    metrics = learner.step(synthetic_trajectories(5, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    for key in ("loss", "kl", "clip_frac_low", "clip_frac_high", "entropy", "grad_norm", "lr", "tokens",
                "tokens_per_s", "groups_skipped", "advantage_mean", "advantage_std", "staleness_mean"):
        assert math.isfinite(metrics[key]), key
    assert metrics["lr"] == pytest.approx(0.5e-2)  # first warmup step: lr * 1/2
    assert metrics["entropy"] > 0 and metrics["grad_norm"] > 0 and metrics["tokens"] > 0


def test_later_mini_batches_are_clipped_against_the_policy_before_the_step(make_learner) -> None:
    learner = make_learner(mini_batches_per_step=2, lr=0.05)
    metrics = learner.step(synthetic_trajectories(6, questions=4, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]]))
    # the first update moves the policy, so the second update sees ratios != 1 and some clip
    assert metrics["optimizer_updates"] == 2.0
    assert metrics["approx_kl"] > 0
    assert metrics["clip_frac"] > 0
    assert metrics["clip_frac"] == pytest.approx(metrics["clip_frac_low"] + metrics["clip_frac_high"])
    assert learner.policy_version == 1


def test_one_on_policy_update_never_clips(make_learner) -> None:
    # ppoEpochs 1, miniBatches 1: the ratio is exactly 1, so the clip range cannot act.
    metrics = make_learner(lr=0.05).step(synthetic_trajectories(6, questions=4,
                                                                rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]]))
    assert metrics["optimizer_updates"] == 1.0
    assert (metrics["clip_frac_low"], metrics["clip_frac_high"], metrics["approx_kl"]) == (0.0, 0.0, 0.0)


def test_ppo_epochs_reuse_the_step_against_the_policy_before_it(make_learner) -> None:
    trajectories = synthetic_trajectories(6, questions=4, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1], [0, 0, 1]])
    learner = make_learner(ppo_epochs=3, mini_batches_per_step=2, lr=0.05)
    metrics = learner.step(trajectories)
    assert metrics["optimizer_updates"] == 6.0 and learner.policy_version == 1
    assert metrics["clip_frac"] > 0 and metrics["approx_kl"] > 0
    # pi_old is the policy before the step, not the one before each update: with an lr of 0 the
    # three passes see ratio 1 throughout
    frozen = make_learner(ppo_epochs=3, lr=1e-12).step(trajectories)
    assert frozen["clip_frac"] == 0.0 and frozen["approx_kl"] == pytest.approx(0.0, abs=1e-9)


def test_token_ids_outside_the_vocabulary_are_an_error(make_learner) -> None:
    learner = make_learner()
    trajectories = synthetic_trajectories(7, questions=1, group_size=2, rewards=[[1, 0]])
    trajectories[0].planner_turns[0].response_ids[0] = TINY_VOCAB + 5
    with pytest.raises(FlowlaneError, match="different tokenizer"):
        learner.step(trajectories)


def test_a_turn_without_prompt_ids_is_an_error(make_learner) -> None:
    learner = make_learner()
    trajectories = synthetic_trajectories(7, questions=1, group_size=2, rewards=[[1, 0]])
    trajectories[1].planner_turns[0].prompt_ids = []
    with pytest.raises(FlowlaneError, match="no prompt ids"):
        learner.step(trajectories)


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_stages_give_the_update_of_stage_0(make_learner, stage: int) -> None:
    trajectories = synthetic_trajectories(8, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]])
    reference = make_learner(zero_stage=0, lr=1e-3)
    reference.step(trajectories)
    expected = weights(reference)
    learner = make_learner(zero_stage=stage, lr=1e-3)
    learner.step(trajectories)
    for name, tensor in learner.export_weights():
        torch.testing.assert_close(tensor, expected[name], atol=1e-5, rtol=1e-4, msg=name)


# --- LoRA -------------------------------------------------------------------------------------------


def test_lora_trains_only_the_adapter(make_learner) -> None:
    learner = make_learner(lora=LoraSettings(r=4, alpha=8, target_modules=("q_proj", "v_proj")))
    module = learner.engine.module
    trainable = {name for name, p in module.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    learner.step(synthetic_trajectories(9, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    for name, p in module.named_parameters():
        if name in trainable:
            if "lora_B" in name:  # starts at zero; the first update must move it
                assert not torch.equal(before[name], p.detach()), name
        else:  # every base weight stays bit-identical
            assert torch.equal(before[name], p.detach()), name


def test_lora_export_is_the_merged_model(make_learner) -> None:
    learner = make_learner(lora=LoraSettings(r=4, alpha=8))
    learner.step(synthetic_trajectories(10, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    merged = copy.deepcopy(learner.engine.module).merge_and_unload()
    expected = dict(merged.named_parameters())
    exported = dict(learner.export_weights())
    assert exported.keys() == expected.keys()
    for name, tensor in exported.items():
        torch.testing.assert_close(tensor, expected[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    assert not any("lora" in name for name in exported)


def test_lora_checkpoint_holds_the_adapter_not_the_base_weights(make_learner, tmp_path: Path) -> None:
    learner = make_learner(lora=LoraSettings(r=4, alpha=8))
    learner.step(synthetic_trajectories(11, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    meta = learner.save_checkpoint_files(tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "ckpt").iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files
    assert "model.safetensors" not in files
    assert meta["training"] == "lora"
    from safetensors.torch import load_file

    adapter = load_file(str(tmp_path / "ckpt" / "adapter_model.safetensors"))
    assert adapter and all("lora_" in name for name in adapter)


# --- checkpoints ------------------------------------------------------------------------------------


def test_full_checkpoint_loads_as_a_transformers_model(make_learner, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    learner = make_learner()
    learner.step(synthetic_trajectories(12, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    meta = learner.save_checkpoint_files(tmp_path / "ckpt")
    assert (meta["step"], meta["policy_version"], meta["training"]) == (1, 1, "full")
    loaded = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ckpt"), dtype=torch.float32)
    state = dict(loaded.named_parameters())
    for name, tensor in learner.export_weights():
        assert torch.equal(state[name].detach(), tensor), name


def test_checkpoint_from_another_model_is_refused(make_learner, tmp_path: Path) -> None:
    writer = make_learner()
    writer.step(synthetic_trajectories(13, rewards=[[1, 0, 0], [0, 1, 1], [1, 0, 1]]))
    writer.save_checkpoint_files(tmp_path / "ckpt")
    other_model = make_tiny_model_dir(tmp_path / "other-model", seed=1)  # same shape, other weights
    reader = make_learner(model_path=str(other_model))
    before = weights(reader)
    with pytest.raises(FlowlaneError, match="was trained from another model"):
        reader.load_checkpoint_files(tmp_path / "ckpt")
    assert reader.policy_version == 0
    assert all(torch.equal(before[name], tensor) for name, tensor in reader.export_weights())


def test_full_checkpoint_is_refused_by_a_lora_learner(make_learner, tmp_path: Path) -> None:
    make_learner().save_checkpoint_files(tmp_path / "ckpt")
    with pytest.raises(FlowlaneError, match="holds full fine-tuning state but this learner is configured for lora"):
        make_learner(lora=LoraSettings(r=4)).load_checkpoint_files(tmp_path / "ckpt")


def test_a_directory_without_learner_state_is_not_a_checkpoint(make_learner, tmp_path: Path) -> None:
    with pytest.raises(FlowlaneError, match="is not a learner checkpoint"):
        make_learner().load_checkpoint_files(tmp_path)


def test_the_shared_layout_computes_each_common_prefix_once(make_learner) -> None:
    trajectories = synthetic_trajectories(5, questions=2, group_size=4, max_turns=1, system_tokens=12,
                                          shared_first_prompt=True, rewards=[[1, 0, 0, 0], [0, 1, 1, 0]])
    shared = make_learner(batch_layout=BatchLayout.SHARED, kl_beta=0.0).step(trajectories)
    padded = make_learner(batch_layout=BatchLayout.PADDED, kl_beta=0.0).step(trajectories)
    assert shared["tokens_processed"] == padded["tokens_processed"]
    # one system prefix, one first prompt per question (its part after the prefix), every response
    turns = [t.planner_turns[0] for t in trajectories]
    tree = 12 + sum(len(turns[4 * q].prompt_ids) - 12 for q in range(2)) + sum(len(t.response_ids) for t in turns)
    assert shared["computed_frac"] * shared["tokens_processed"] <= tree
    assert shared["computed_frac"] < 0.6 and shared["padding_frac"] == 0.0
    assert shared["loss"] == pytest.approx(padded["loss"], abs=1e-6)
