"""Optional networked tools: web search and Wikipedia search, configured by environment variables.

flowlane runs offline by default; these plug-ins exist for deployments that have internet access
(the paper's Google_Search and Wikipedia_Search). Each reads its endpoint (and key) from the
environment, which on a cluster comes from a Secret. Unconfigured, a tool still loads, so a
FlowRun listing it is valid everywhere, but every call returns ``ok=False`` with a message that
names the variable to set, and no network request is made.

- ``web_search``: ``FLOWLANE_WEB_SEARCH_URL``, a JSON search endpoint in the SearxNG format
  (``GET URL?q=...&format=json`` answering ``{"results": [{"title", "url", "content"}]}``);
  ``FLOWLANE_WEB_SEARCH_API_KEY``, optional, is sent as a bearer token.
- ``wikipedia_search``: ``FLOWLANE_WIKIPEDIA_API_URL``, a MediaWiki action API
  (e.g. ``https://en.wikipedia.org/w/api.php``): a full-text search, then the plain-text
  introductions of the top pages.
"""

from __future__ import annotations

import os
import re
from typing import Any

import httpx

from flowlane.runtime.tools.base import Tool, ToolResult

WEB_SEARCH_URL_ENV = "FLOWLANE_WEB_SEARCH_URL"
WEB_SEARCH_KEY_ENV = "FLOWLANE_WEB_SEARCH_API_KEY"
WIKIPEDIA_URL_ENV = "FLOWLANE_WIKIPEDIA_API_URL"
TIMEOUT_S = 15.0
MAX_SNIPPET_CHARS = 600
_TAGS = re.compile(r"<[^>]+>")
_QUERY_SCHEMA = {
    "type": "object",
    "properties": {"command": {"type": "string", "description": "search query"}},
    "required": ["command"],
}


def _clip(text: str, limit: int = MAX_SNIPPET_CHARS) -> str:
    text = " ".join(_TAGS.sub("", text).split())
    return text if len(text) <= limit else text[:limit] + "..."


class _NetworkedTool(Tool):
    """Shared shell: configuration from the environment, one HTTP client, errors as results."""

    url_env: str = ""
    hint: str = ""

    def __init__(self, k: int = 3) -> None:
        self.k = k
        self.url = os.environ.get(self.url_env, "").strip()
        self.input_schema = dict(_QUERY_SCHEMA)
        self._client: httpx.AsyncClient | None = None

    @property
    def configured(self) -> bool:
        return bool(self.url)

    def not_configured(self) -> ToolResult:
        return ToolResult(
            f"{self.name} is not configured: set {self.url_env} ({self.hint}) to enable it",
            ok=False,
            error=f"not configured: set {self.url_env}",
        )

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=TIMEOUT_S, headers=self.headers())
        return self._client

    def headers(self) -> dict[str, str]:
        return {"User-Agent": "flowlane-agent/0.1"}

    async def execute(self, command: str) -> ToolResult:
        if not self.configured:
            return self.not_configured()
        query = command.strip()
        if not query:
            return ToolResult("empty query", ok=False, error="empty command")
        try:
            return await self.search(query)
        except httpx.HTTPStatusError as exc:
            return ToolResult(f"{self.name}: the endpoint answered HTTP {exc.response.status_code}", ok=False,
                              error=f"http {exc.response.status_code}")  # fmt: skip
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            return ToolResult(f"{self.name}: request failed: {type(exc).__name__}: {exc}", ok=False,
                              error="unreachable" if isinstance(exc, httpx.TransportError) else "bad response")

    async def search(self, query: str) -> ToolResult:
        raise NotImplementedError

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class WebSearchTool(_NetworkedTool):
    name = "web_search"
    description = "Searches the web and returns the top results with titles, URLs and snippets."
    command_instruction = "Write a concise web search query."
    url_env = WEB_SEARCH_URL_ENV
    hint = "a SearxNG-style JSON search endpoint"

    def __init__(self, k: int = 3) -> None:
        super().__init__(k)
        self.api_key = os.environ.get(WEB_SEARCH_KEY_ENV, "").strip()
        self.metadata: dict[str, Any] = {
            "best_for": "recent or general facts not in the local corpus",
            "limitations": "needs internet access; snippets may be incomplete",
            "configured": self.configured,
        }

    def headers(self) -> dict[str, str]:
        headers = super().headers()
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    async def search(self, query: str) -> ToolResult:
        response = await self.client().get(self.url, params={"q": query, "format": "json"})
        response.raise_for_status()
        results = response.json().get("results", [])[: self.k]
        if not results:
            return ToolResult(f"no results for {query!r}")
        lines = [
            f"[{i}] {r.get('title', '')} ({r.get('url', '')}): {_clip(str(r.get('content', '')))}"
            for i, r in enumerate(results, start=1)
        ]
        return ToolResult("\n".join(lines), details={"urls": [r.get("url", "") for r in results]})


class WikipediaSearchTool(_NetworkedTool):
    name = "wikipedia_search"
    description = "Searches Wikipedia and returns the introductions of the best matching articles."
    command_instruction = "Write a short query, usually the name of the article's subject."
    url_env = WIKIPEDIA_URL_ENV
    hint = "a MediaWiki API URL such as https://en.wikipedia.org/w/api.php"

    def __init__(self, k: int = 3) -> None:
        super().__init__(k)
        self.metadata = {
            "best_for": "encyclopedic facts about real people, places and events",
            "limitations": "needs internet access; introductions only",
            "configured": self.configured,
        }

    async def search(self, query: str) -> ToolResult:
        client = self.client()
        found = await client.get(self.url, params={
            "action": "query", "list": "search", "srsearch": query, "srlimit": self.k, "format": "json",
        })  # fmt: skip
        found.raise_for_status()
        hits = found.json()["query"]["search"]
        if not hits:
            return ToolResult(f"no Wikipedia article matches {query!r}")
        titles = [hit["title"] for hit in hits]
        pages = await client.get(self.url, params={
            "action": "query", "prop": "extracts", "exintro": 1, "explaintext": 1,
            "titles": "|".join(titles), "format": "json",
        })  # fmt: skip
        pages.raise_for_status()
        intro = {p.get("title"): p.get("extract", "") for p in pages.json()["query"]["pages"].values()}
        lines = [
            f"[{i}] {title}: {_clip(intro.get(title) or hit.get('snippet', ''))}"
            for i, (title, hit) in enumerate(zip(titles, hits, strict=True), start=1)
        ]
        return ToolResult("\n".join(lines), details={"titles": titles})
