"""Task sets: bundled sets are deterministic, splits never overlap, multihop needs the corpus;
user data loads from JSONL, Parquet and S3 with one-line errors for bad input."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from flowlane.api.errors import ConfigError
from flowlane.kit.tasks import Split, Task, bundled_task_sets, load_tasks
from flowlane.kit.tasks.multihop import CORPUS_FILE, rendered_files
from flowlane.runtime.rewards import check_game24, score
from flowlane.runtime.tools.search_tool import SearchTool


def questions(tasks: list[Task]) -> set[str]:
    return {t.question for t in tasks}


# -- bundled sets ------------------------------------------------------------------------------


def test_bundled_sets_are_listed() -> None:
    assert bundled_task_sets() == ["arithmetic", "game24", "multihop"]


@pytest.mark.parametrize(("name", "train", "test"), [("arithmetic", 400, 100), ("game24", 400, 100),
                                                      ("multihop", 300, 80)])  # fmt: skip
def test_bundled_split_sizes(name: str, train: int, test: int) -> None:
    assert (len(load_tasks(name, "train")), len(load_tasks(name, "test"))) == (train, test)


@pytest.mark.parametrize("name", ["arithmetic", "game24", "multihop"])
def test_train_and_test_questions_never_overlap(name: str) -> None:
    assert not questions(load_tasks(name, "train")) & questions(load_tasks(name, "test"))


@pytest.mark.parametrize("name", ["arithmetic", "game24", "multihop"])
def test_questions_are_unique_within_a_set(name: str) -> None:
    tasks = load_tasks(name, "all")
    assert len(questions(tasks)) == len(tasks) and len({t.id for t in tasks}) == len(tasks)


def test_held_out_is_an_alias_of_test() -> None:
    assert load_tasks("arithmetic", "held_out") == load_tasks("arithmetic", "test")


def test_splits_are_pinned_to_exact_values() -> None:
    # Any change in generation (seed, RNG, format) shows up here first.
    assert load_tasks("arithmetic", "train")[0] == Task("arithmetic-train-0000", "What is 25 * 588?", "14700",
                                                        "arithmetic", "numeric")  # fmt: skip
    assert load_tasks("arithmetic", "test")[0].question == "What is 5734 + 52125?"
    assert load_tasks("game24", "test")[0].meta == {"numbers": [2, 3, 13, 13]}
    first = load_tasks("multihop", "test")[0]
    assert (first.question, first.answer) == ("In what year was the founder of Drumlin Pharmaceuticals born?", "1859")


def test_arithmetic_answers_are_exact() -> None:
    for t in load_tasks("arithmetic", "all"):
        expression = t.question.removeprefix("What is ").removesuffix("?")
        assert int(t.answer) == eval(expression), t  # trusted, generated text
        assert score(t.reward, f"Answer: {t.answer}", t) == 1.0


def test_game24_reference_solutions_are_valid_and_use_the_questions_numbers() -> None:
    for t in load_tasks("game24", "all"):
        assert check_game24(t.answer, t.meta["numbers"]) == (True, "ok"), t
        assert score("game24", t.answer, Task(t.id, t.question, "", "game24")) == 1.0  # numbers from the text


def test_game24_number_sets_differ_between_splits() -> None:
    def sets(split: str) -> set[tuple[int, ...]]:
        return {tuple(sorted(t.meta["numbers"])) for t in load_tasks("game24", split)}

    assert not sets("train") & sets("test")


def test_multihop_held_out_facts_never_occur_in_training_questions() -> None:
    def passages(split: str) -> set[str]:
        return {p for t in load_tasks("multihop", split) for p in t.meta["gold_passages"]}

    assert not passages("train") & passages("test")


def test_multihop_answers_need_the_second_passage() -> None:
    corpus = {row["id"]: row for row in map(json.loads, CORPUS_FILE.read_text().splitlines())}
    for t in load_tasks("multihop", "all"):
        first, second = (corpus[p]["text"] for p in t.meta["gold_passages"])
        assert t.answer not in first and t.answer in second, t
        assert t.meta["bridge"] in first


async def test_multihop_gold_passages_are_in_the_search_tools_top_k() -> None:
    # Hop 1: the question finds the passage naming the bridge; hop 2: the bridge finds the answer.
    tool = SearchTool(k=3)
    for t in load_tasks("multihop", "all"):
        first = await tool.execute(t.question)
        second = await tool.execute(t.meta["bridge"])
        assert t.meta["gold_passages"][0] in first.details["passage_ids"], t
        assert t.meta["gold_passages"][1] in second.details["passage_ids"], t
        assert t.answer in second.output


def test_corpus_has_a_few_hundred_passages_and_distractors() -> None:
    corpus = [json.loads(line) for line in CORPUS_FILE.read_text().splitlines()]
    gold = {p for t in load_tasks("multihop", "all") for p in t.meta["gold_passages"]}
    assert len(corpus) == 456
    assert len(corpus) - len(gold) == 103  # passages that are no question's gold: distractors


def test_bundled_data_files_match_the_generator() -> None:
    for path, text in rendered_files().items():
        assert path.read_text(encoding="utf-8") == text, f"{path} drifted: python -m flowlane.kit.tasks.multihop"


def test_unknown_task_set_names_the_bundled_ones() -> None:
    with pytest.raises(ConfigError, match=r"task set 'math-mini': not a bundled set \(arithmetic, game24, multihop\)"):
        load_tasks("math-mini", "train")


def test_unknown_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown split 'dev'"):
        load_tasks("arithmetic", "dev")


# -- user data ---------------------------------------------------------------------------------

ROWS = [
    {"question": "What is 2 + 2?", "answer": 4, "source": "mine"},
    {"question": "Capital of Calvessa?", "answer": "Ardenmoor", "source": "mine", "reward": "exact", "level": 3},
]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def parquet_bytes(rows: list[dict[str, Any]]) -> bytes:
    buffer = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buffer)
    return buffer.getvalue()


def test_jsonl_rows_become_tasks(tmp_path: Path) -> None:
    tasks = load_tasks(str(write_jsonl(tmp_path / "mine.jsonl", ROWS)), "all")
    assert tasks == [
        Task("mine-00000", "What is 2 + 2?", "4", "mine", "numeric"),
        Task("mine-00001", "Capital of Calvessa?", "Ardenmoor", "mine", "exact"),
    ]
    assert tasks[1].meta == {"level": 3}


def test_parquet_rows_become_tasks(tmp_path: Path) -> None:
    path = tmp_path / "mine.parquet"
    path.write_bytes(parquet_bytes([{**r, "answer": str(r["answer"])} for r in ROWS]))
    assert [(t.question, t.answer, t.reward) for t in load_tasks(str(path), "all")] == [
        ("What is 2 + 2?", "4", "numeric"), ("Capital of Calvessa?", "Ardenmoor", "exact"),
    ]  # fmt: skip


def test_jsonl_missing_column_names_the_column_and_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [ROWS[0], {"question": "q", "answer": "a"}])
    with pytest.raises(ConfigError, match=rf"task file {path}:2: missing column 'source'"):
        load_tasks(str(path), "all")


def test_parquet_missing_column_names_the_column_and_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(parquet_bytes([{"question": "q", "source": "s"}]))
    with pytest.raises(ConfigError, match=rf"task file {path}: missing column 'answer' \(it has question, source"):
        load_tasks(str(path), "all")


def test_unknown_reward_in_a_row_names_the_row(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{**ROWS[0], "reward": "vibes"}])
    with pytest.raises(ConfigError, match=rf"task file {path}:1: unknown reward 'vibes'"):
        load_tasks(str(path), "all")


def test_empty_question_is_refused(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "bad.jsonl", [{**ROWS[0], "question": "  "}])
    with pytest.raises(ConfigError, match=rf"task file {path}:1: empty question"):
        load_tasks(str(path), "all")


def test_split_column_selects_rows(tmp_path: Path) -> None:
    rows = [{**ROWS[0], "split": "train"}, {**ROWS[1], "split": "held_out"}]
    path = write_jsonl(tmp_path / "split.jsonl", rows)
    assert [t.question for t in load_tasks(str(path), "test")] == ["Capital of Calvessa?"]


def test_file_without_split_column_is_split_by_question_hash(tmp_path: Path) -> None:
    rows = [{"question": f"What is {i} + 1?", "answer": i + 1, "source": "mine"} for i in range(200)]
    path = str(write_jsonl(tmp_path / "many.jsonl", rows))
    train, test = load_tasks(path, "train"), load_tasks(path, "test")
    assert (len(train), len(test)) == (184, 16)
    assert not questions(train) & questions(test)
    assert load_tasks(path, "test") == test


def test_directory_holds_one_file_per_split(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [ROWS[0]])
    (tmp_path / "test.parquet").write_bytes(parquet_bytes([{**ROWS[1], "answer": "Ardenmoor"}]))
    assert [t.question for t in load_tasks(str(tmp_path), "train")] == ["What is 2 + 2?"]
    assert [t.question for t in load_tasks(str(tmp_path), "test")] == ["Capital of Calvessa?"]


def test_directory_without_the_split_file_says_what_it_expected(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "train.jsonl", [ROWS[0]])
    with pytest.raises(ConfigError, match=r"no file for split 'test'; expected test\.jsonl or test\.parquet"):
        load_tasks(str(tmp_path), "test")


# -- S3 ----------------------------------------------------------------------------------------


def test_s3_jsonl_object_loads(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket("tasks")
    data = "".join(json.dumps(r) + "\n" for r in ROWS).encode()
    s3_server.client().put_object(bucket, "sets/mine.jsonl", io.BytesIO(data), len(data))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    tasks = load_tasks(f"s3://{bucket}/sets/mine.jsonl", "all")
    assert [(t.question, t.answer) for t in tasks] == [("What is 2 + 2?", "4"), ("Capital of Calvessa?", "Ardenmoor")]


def test_s3_prefix_holds_one_file_per_split(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket("tasks")
    test_rows = parquet_bytes([{**ROWS[1], "answer": "Ardenmoor"}])
    s3_server.client().put_object(bucket, "run/test.parquet", io.BytesIO(test_rows), len(test_rows))
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    assert [t.answer for t in load_tasks(f"s3://{bucket}/run", Split.TEST)] == ["Ardenmoor"]


def test_s3_missing_object_is_a_one_line_error(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    bucket = s3_server.make_bucket("tasks")
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=rf"task set s3://{bucket}/nope.jsonl: S3 said NoSuchKey"):
        load_tasks(f"s3://{bucket}/nope.jsonl", "all")


def test_s3_without_credentials_names_the_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("FLOWLANE_S3_ENDPOINT", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(ConfigError, match="set FLOWLANE_S3_ENDPOINT, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY"):
        load_tasks("s3://bucket/tasks.jsonl", "all")


def test_the_validation_split_is_disjoint_deterministic_and_stable() -> None:
    from flowlane.kit.tasks import carve_validation

    tasks = load_tasks("arithmetic", "train")
    train, validation = carve_validation(tasks, 0.1, seed=0)
    assert len(validation) == round(0.1 * len(tasks)) and len(train) + len(validation) == len(tasks)
    assert not {t.id for t in train} & {t.id for t in validation}
    assert carve_validation(tasks, 0.1, seed=0) == (train, validation)  # the same every time
    # a task's side depends on its own id and the seed, not on the order of the file
    _, shuffled = carve_validation(list(reversed(tasks)), 0.1, seed=0)
    assert {t.id for t in shuffled} == {t.id for t in validation}
    assert {t.id for t in carve_validation(tasks, 0.1, seed=1)[1]} != {t.id for t in validation}
    assert carve_validation(tasks, 0.0, seed=0) == (tasks, [])
    assert [len(part) for part in carve_validation(tasks[:2], 0.5, seed=0)] == [1, 1]  # one left to train on
    assert [len(part) for part in carve_validation(tasks[:1], 0.5, seed=0)] == [1, 0]
    with pytest.raises(ConfigError, match=r"validation fraction: must be in \[0, 0.5\], got 0.7"):
        carve_validation(tasks, 0.7, seed=0)
