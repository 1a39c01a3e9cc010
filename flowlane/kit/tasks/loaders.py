"""``load_tasks(spec, split)``: bundled task sets by name, user data from a path or ``s3://``.

``spec`` is, in order of precedence:

- a bundled set: ``arithmetic``, ``game24``, ``multihop`` (offline, deterministic splits);
- ``s3://bucket/key.jsonl`` (or ``.parquet``), or ``s3://bucket/prefix`` holding one file per
  split (``train.jsonl``, ``test.parquet``, ...); the endpoint and keys come from
  ``FLOWLANE_S3_ENDPOINT`` (``host:port`` or an ``http(s)://`` URL), ``AWS_ACCESS_KEY_ID`` and
  ``AWS_SECRET_ACCESS_KEY``;
- a local ``.jsonl`` / ``.parquet`` file, or a directory holding one file per split.

User rows need ``question``, ``answer`` and ``source``. Optional: ``id``; ``reward`` (a reward
name; default ``numeric`` when the answer is a number, else ``exact``); ``split``. Any other
column is kept in ``Task.meta`` (``numbers`` for a game24 row, for instance). A file with a
``split`` column is filtered by it; a file without one is split deterministically by a hash of
the question (one row in ten is ``test``), so the same file can serve training and evaluation
without overlap; ``split="all"`` takes every row.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from flowlane.api.enums import RewardKind
from flowlane.api.errors import ConfigError
from flowlane.kit import s3
from flowlane.kit.tasks.generators import arithmetic_tasks, game24_tasks
from flowlane.kit.tasks.multihop import QUESTION_FILES
from flowlane.kit.tasks.task import Split, Task, resolve_kind, resolve_split

REQUIRED_COLUMNS = ("question", "answer", "source")
_KNOWN_COLUMNS = {"id", "question", "answer", "source", "reward", "split"}
_SUFFIXES = (".jsonl", ".parquet")
_NUMBER_ANSWER = re.compile(r"\s*[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?\s*")
_TEST_SHARE = 10  # one row in ten goes to test when a file has no split column
_MAX_OBJECT_BYTES = 1 << 30

S3_ENDPOINT_ENV = s3.ENDPOINT_ENV
S3_ACCESS_KEY_ENV = s3.ACCESS_KEY_ENV
S3_SECRET_KEY_ENV = s3.SECRET_KEY_ENV


def multihop_tasks(split: Split) -> list[Task]:
    tasks = []
    for line in QUESTION_FILES[split].read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        meta = {k: row[k] for k in ("type", "bridge", "gold_passages")}
        tasks.append(Task(row["id"], row["question"], row["answer"], row["source"], row["reward"], meta))
    return tasks


_BUNDLED: dict[str, Callable[[Split], list[Task]]] = {
    "arithmetic": arithmetic_tasks,
    "game24": game24_tasks,
    "multihop": multihop_tasks,
}


def bundled_task_sets() -> list[str]:
    return list(_BUNDLED)


def load_tasks(spec: str, split: str | Split = Split.TRAIN) -> list[Task]:
    """The tasks of ``spec`` (a bundled set name, a path or an s3:// URI) in ``split``."""
    spec = str(spec).strip()
    if not spec:
        raise ConfigError(f"task set: empty name; use one of {', '.join(_BUNDLED)}, a file path or an s3:// URI")
    wanted = resolve_split(split)
    if spec in _BUNDLED:
        if wanted is Split.ALL:
            return _BUNDLED[spec](Split.TRAIN) + _BUNDLED[spec](Split.TEST)
        return _BUNDLED[spec](wanted)
    if spec.startswith("s3://"):
        return _load_s3(spec, wanted)
    path = Path(spec).expanduser()
    if path.is_dir():
        files = _split_files(path, [p.name for p in path.iterdir() if p.is_file()], wanted)
        return [t for name in files for t in _parse(path / name, (path / name).read_bytes(), wanted, by_file=True)]
    if path.is_file():
        return _parse(path, path.read_bytes(), wanted)
    raise ConfigError(
        f"task set '{spec}': not a bundled set ({', '.join(_BUNDLED)}) and no such file or directory"
    )


# -- files -------------------------------------------------------------------------------------


def _split_files(where: Path | str, names: Iterable[str], split: Split) -> list[str]:
    """The files of a per-split directory (or S3 prefix) that hold ``split``."""
    data = sorted(n for n in names if n.endswith(_SUFFIXES))
    chosen = data if split is Split.ALL else [n for n in data if _split_of_name(n) is split]
    if not chosen:
        raise ConfigError(
            f"task set {where}: no file for split '{split.value}'; expected {split.value}.jsonl or "
            f"{split.value}.parquet (found: {', '.join(data) or 'no .jsonl/.parquet files'})"
        )
    return chosen


def _split_of_name(name: str) -> Split | None:
    try:
        return resolve_split(name.rsplit(".", 1)[0])
    except ConfigError:
        return None


def _parse(origin: Path | str, data: bytes, split: Split, *, by_file: bool = False) -> list[Task]:
    """Tasks from the bytes of one JSONL or Parquet file; ``by_file``: the file is one split."""
    name = str(origin)
    if name.endswith(".parquet"):
        rows = _parquet_rows(origin, data)
    elif name.endswith((".jsonl", ".json")):
        rows = _jsonl_rows(origin, data)
    else:
        raise ConfigError(f"task file {origin}: unsupported format; use .jsonl or .parquet")
    tasks = _tasks_from_rows(origin, rows, split, by_file=by_file)
    if not tasks:
        raise ConfigError(f"task file {origin}: no tasks for split '{split.value}'")
    return tasks


def _jsonl_rows(origin: Path | str, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    rows = []
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"task file {origin}: not UTF-8 text; expected JSON lines") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise ConfigError(f"task file {origin}:{number}: not valid JSON") from None
        if not isinstance(row, dict):
            raise ConfigError(f"task file {origin}:{number}: expected a JSON object per line")
        rows.append((f"{origin}:{number}", row))
    for column in REQUIRED_COLUMNS:
        for where, row in rows:
            if column not in row:
                raise ConfigError(
                    f"task file {where}: missing column '{column}' (every row needs {', '.join(REQUIRED_COLUMNS)})"
                )
    return rows


def _parquet_rows(origin: Path | str, data: bytes) -> list[tuple[str, dict[str, Any]]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowException, OSError) as exc:
        raise ConfigError(f"task file {origin}: not a readable Parquet file ({exc})") from None
    for column in REQUIRED_COLUMNS:
        if column not in table.column_names:
            raise ConfigError(
                f"task file {origin}: missing column '{column}' (it has {', '.join(table.column_names)}; "
                f"needed: {', '.join(REQUIRED_COLUMNS)})"
            )
    return [(f"{origin}, row {i}", row) for i, row in enumerate(table.to_pylist())]


def _default_reward(answer: str) -> str:
    return (RewardKind.NUMERIC if _NUMBER_ANSWER.fullmatch(answer) else RewardKind.EXACT).value


def _hash_split(question: str) -> Split:
    digest = hashlib.sha256(question.encode("utf-8")).digest()
    return Split.TEST if int.from_bytes(digest[:8], "big") % _TEST_SHARE == 0 else Split.TRAIN


def _tasks_from_rows(
    origin: Path | str, rows: list[tuple[str, dict[str, Any]]], split: Split, *, by_file: bool
) -> list[Task]:
    stem = Path(str(origin)).stem
    tasks = []
    for index, (where, row) in enumerate(rows):
        question = str(row["question"] or "").strip()
        if not question:
            raise ConfigError(f"task file {where}: empty question")
        if row["answer"] is None or not str(row["answer"]).strip():
            raise ConfigError(f"task file {where}: empty answer")
        answer = str(row["answer"]).strip()
        if not by_file and split is not Split.ALL:
            if row.get("split") is not None:
                try:
                    row_split = resolve_split(str(row["split"]))
                except ConfigError as exc:
                    raise ConfigError(f"task file {where}: {exc}") from None
            else:
                row_split = _hash_split(question)
            if row_split is not split:
                continue
        try:
            reward = resolve_kind(row["reward"]).value if row.get("reward") else _default_reward(answer)
        except ConfigError as exc:
            raise ConfigError(f"task file {where}: {exc}") from None
        meta = {k: v for k, v in row.items() if k not in _KNOWN_COLUMNS}
        task_id = str(row.get("id") or f"{stem}-{index:05d}")
        tasks.append(Task(task_id, question, answer, str(row["source"]), reward, meta))
    return tasks


# -- S3 ----------------------------------------------------------------------------------------


def _s3_client(uri: str) -> Any:
    import urllib3

    endpoint = os.environ.get(S3_ENDPOINT_ENV, "").strip()
    access_key = os.environ.get(S3_ACCESS_KEY_ENV, "").strip()
    secret_key = os.environ.get(S3_SECRET_KEY_ENV, "").strip()
    if not (endpoint and access_key and secret_key):
        missing = [
            name for name, value in ((S3_ENDPOINT_ENV, endpoint), (S3_ACCESS_KEY_ENV, access_key),
                                     (S3_SECRET_KEY_ENV, secret_key)) if not value
        ]  # fmt: skip
        raise ConfigError(f"task set {uri}: set {', '.join(missing)} to read tasks from S3")
    retries = urllib3.Retry(total=2, connect=1, read=1, backoff_factor=0.2)
    return s3.open_client(endpoint, access_key, secret_key, region=s3.env_region(), retries=retries)


def _s3_call(uri: str, fn: Callable[[], Any]) -> Any:
    import urllib3
    from minio.error import MinioException, S3Error

    try:
        return fn()
    except S3Error as exc:
        raise ConfigError(f"task set {uri}: S3 said {exc.code}: {exc.message}") from None
    except (urllib3.exceptions.HTTPError, MinioException, OSError) as exc:
        endpoint = os.environ.get(S3_ENDPOINT_ENV, "")
        reason = " ".join(str(exc).split())[:200]
        raise ConfigError(f"task set {uri}: cannot reach S3 endpoint {endpoint} ({reason})") from None


def _read_object(client: Any, uri: str, bucket: str, key: str) -> bytes:
    def fetch() -> bytes:
        response = client.get_object(bucket, key)
        try:
            data = response.read(_MAX_OBJECT_BYTES + 1)
        finally:
            response.close()
            response.release_conn()
        if len(data) > _MAX_OBJECT_BYTES:
            raise ConfigError(f"task set {uri}: larger than {_MAX_OBJECT_BYTES} bytes; split it into files")
        return bytes(data)

    return bytes(_s3_call(uri, fetch))


def _load_s3(uri: str, split: Split) -> list[Task]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket:
        raise ConfigError(f"task set {uri}: expected s3://bucket/key.jsonl or s3://bucket/prefix")
    client = _s3_client(uri)
    if key.endswith((*_SUFFIXES, ".json")):
        return _parse(f"s3://{bucket}/{key}", _read_object(client, uri, bucket, key), split)
    prefix = key.rstrip("/") + "/" if key else ""
    listed = _s3_call(uri, lambda: [o.object_name for o in client.list_objects(bucket, prefix=prefix)])
    names = [name[len(prefix) :] for name in listed if "/" not in name[len(prefix) :]]
    tasks = []
    for name in _split_files(uri, names, split):
        data = _read_object(client, uri, bucket, prefix + name)
        tasks += _parse(f"s3://{bucket}/{prefix}{name}", data, split, by_file=True)
    return tasks
