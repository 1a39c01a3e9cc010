"""The ``search`` tool: BM25 over a local corpus of titled passages (offline retrieval).

The corpus is JSONL, one passage per line: ``{"id": ..., "title": ..., "text": ...}``; the
bundled one (``flowlane/kit/tasks/data/corpus.jsonl``) describes the fictional world the ``multihop``
questions are about. Indexing uses the ``bm25s`` library over title + text with English stop
words removed; the index is built once per corpus file (keyed by path, size and modification
time) and shared by every tool instance in the process, so a rollout worker with many agents
indexes once.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flowlane.api.errors import ConfigError
from flowlane.kit.tasks.multihop import CORPUS_FILE
from flowlane.runtime.tools.base import Tool, ToolResult

DEFAULT_CORPUS = CORPUS_FILE
DEFAULT_TOP_K = 3


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


class CorpusIndex:
    """A BM25 index over the passages of one corpus file."""

    def __init__(self, passages: list[Passage]) -> None:
        import bm25s

        if not passages:
            raise ConfigError("search corpus: no passages to index")
        self.passages = passages
        self._retriever = bm25s.BM25()
        tokens = bm25s.tokenize(
            [f"{p.title}\n{p.text}" for p in passages], stopwords="en", return_ids=False, show_progress=False
        )
        self._retriever.index(tokens, show_progress=False)

    def search(self, query: str, k: int = DEFAULT_TOP_K) -> list[tuple[Passage, float]]:
        """The ``k`` best passages for ``query`` with their scores, best first; [] if nothing matches."""
        import bm25s

        tokens = bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not tokens or not tokens[0]:
            return []
        k = min(k, len(self.passages))
        documents, scores = self._retriever.retrieve(
            tokens, k=k, show_progress=False, backend_selection="numpy", n_threads=1
        )
        return [
            (self.passages[int(doc)], float(score))
            for doc, score in zip(documents[0], scores[0], strict=True)
            if score > 0
        ]


def load_passages(path: Path) -> list[Passage]:
    passages = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"search corpus {path}: cannot read it ({exc.strerror}); pass an existing .jsonl") from None
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            passages.append(Passage(str(row.get("id", number)), str(row.get("title", "")), str(row["text"])))
        except (ValueError, KeyError, AttributeError):
            raise ConfigError(
                f"search corpus {path}:{number}: expected a JSON object with 'text' (and 'title', 'id')"
            ) from None
    return passages


_INDEXES: dict[tuple[str, int, int], CorpusIndex] = {}
_INDEX_LOCK = threading.Lock()


def corpus_index(path: Path | str | None = None) -> CorpusIndex:
    """The (cached) index of the corpus at ``path`` (the bundled corpus by default)."""
    resolved = Path(path or DEFAULT_CORPUS).resolve()
    try:
        stat = resolved.stat()
    except OSError:
        raise ConfigError(f"search corpus {resolved}: no such file; pass an existing .jsonl corpus") from None
    key = (str(resolved), stat.st_size, stat.st_mtime_ns)
    with _INDEX_LOCK:
        if key not in _INDEXES:
            _INDEXES[key] = CorpusIndex(load_passages(resolved))
        return _INDEXES[key]


def format_passages(hits: list[tuple[Passage, float]]) -> str:
    return "\n".join(f"[{i}] {p.title}: {p.text}" for i, (p, _) in enumerate(hits, start=1))


class SearchTool(Tool):
    name = "search"
    description = (
        "Searches a local encyclopedia of passages (people, towns, companies, books, bands) and "
        "returns the best matching passages with their titles."
    )
    command_instruction = (
        "Write a short keyword query, usually the exact name of the one entity you need facts about "
        "(a person, town, company, book or band)."
    )
    def __init__(self, corpus_path: Path | str | None = None, k: int = DEFAULT_TOP_K) -> None:
        if k < 1:
            raise ConfigError(f"search tool: k must be >= 1, got {k}")
        self.corpus_path = Path(corpus_path or DEFAULT_CORPUS)
        self.k = k
        self.input_schema = {
            "type": "object",
            "properties": {"command": {"type": "string", "description": "keyword search query"}},
            "required": ["command"],
        }
        self.metadata: dict[str, Any] = {
            "best_for": "facts about named entities; one entity per query",
            "output": f"the top {k} passages as '[n] Title: text'",
            "limitations": "only the local corpus (offline); follow a name found in one passage with a new search",
        }
        corpus_index(self.corpus_path)  # index now: a bad path fails at startup, not mid-run

    async def execute(self, command: str) -> ToolResult:
        query = command.strip()
        if not query:
            return ToolResult("empty query: write the name of what you are looking for", ok=False,
                              error="empty command")  # fmt: skip
        hits = corpus_index(self.corpus_path).search(query, self.k)
        if not hits:
            return ToolResult(f"no passage matches {query!r}; try other keywords", ok=True,
                              details={"passage_ids": []})  # fmt: skip
        return ToolResult(format_passages(hits), details={"passage_ids": [p.id for p, _ in hits]})
