"""CPU budgets: the cgroup quota, the learner's torch threads, where vLLM pins its threads."""

from pathlib import Path

from flowlane.kit.cpus import cgroup_cpu_limit, cpu_budget, learner_threads, own_cpus


def test_cgroup_cpu_limit_rounds_a_quota_up_to_whole_cpus(tmp_path: Path) -> None:
    cpu_max, v1 = tmp_path / "cpu.max", tmp_path / "v1"
    cases = {"max 100000\n": None, "200000 100000\n": 2, "150000 100000\n": 2, "50000 100000\n": 1}
    for text, expected in cases.items():
        cpu_max.write_text(text)
        assert cgroup_cpu_limit(cpu_max, v1) == expected, text
    assert cgroup_cpu_limit(tmp_path / "missing", v1) is None
    v1.mkdir()
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    for quota, expected in {"-1\n": None, "300000\n": 3, "10000\n": 1}.items():
        (v1 / "cpu.cfs_quota_us").write_text(quota)
        assert cgroup_cpu_limit(tmp_path / "missing", v1) == expected, quota


def test_the_cpu_budget_is_the_affinity_capped_by_the_quota() -> None:
    assert cpu_budget(set(range(64)), 2) == 2  # a pod with a 2-CPU limit on a 64-core node
    assert cpu_budget({0, 1}, None) == 2 and cpu_budget({0, 1}, 8) == 2 and cpu_budget({5}, None) == 1


def test_learner_ranks_share_the_budget_unless_omp_num_threads_says_otherwise() -> None:
    assert learner_threads({}, 8) == 8  # one rank in its pod: every CPU of it
    assert learner_threads({"LOCAL_WORLD_SIZE": "4"}, 8) == 2
    # `flowlane run` with two pods of one rank each on a 2-core machine: one thread each.
    assert learner_threads({"FLOWLANE_COLOCATED_RANKS": "2", "LOCAL_WORLD_SIZE": "1"}, 2) == 1
    assert learner_threads({"FLOWLANE_COLOCATED_RANKS": "6"}, 2) == 1  # never below one
    assert learner_threads({"OMP_NUM_THREADS": "3"}, 8) is None  # the user's (or torchrun's) value stays


def test_threads_are_bound_only_where_the_process_owns_its_cpus() -> None:
    assert own_cpus({0, 1}, None) and own_cpus({0, 1}, 2) and own_cpus({4, 5}, 3)
    assert not own_cpus(set(range(64)), 2)  # a pod in a node's shared pool: vLLM's binding stays
