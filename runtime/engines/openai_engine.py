"""OpenAI-compatible HTTP engine: frozen modules served somewhere else.

The executor, verifier and generator use a frozen LLM; it can live behind any OpenAI-compatible
``/chat/completions`` endpoint (a vLLM or SGLang server, a hosted API). Such endpoints return text,
not the exact token ids and sampling log-probs a trained planner needs, so this engine reports
``reports_token_ids = False`` and returns empty id lists; the agent refuses it for a planner under
training.

Structured output is opt-in (``structured_output=True``) because not every compatible server
enforces ``response_format: json_schema``; without it the caller's parser handles free text.
Talks HTTP through ``httpx`` directly: one small request shape, clear errors, no SDK state.
"""

from __future__ import annotations

import os
from typing import Any

import httpx

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings


class OpenAIEngine(LLMEngine):
    """Chat completions from an OpenAI-compatible endpoint at ``base_url`` (e.g. ``http://host:8000/v1``)."""

    name = "openai"
    reports_token_ids = False

    def __init__(
        self,
        model: str,
        *,
        base_url: str = "http://127.0.0.1:8000/v1",
        api_key: str | None = None,
        timeout_s: float = 120.0,
        structured_output: bool = False,
    ) -> None:
        super().__init__()
        if not model:
            raise ConfigError("the openai engine needs a model name (the name the endpoint serves)")
        if not base_url.startswith(("http://", "https://")):
            raise ConfigError(f"openai engine base_url must start with http:// or https://, got {base_url!r}")
        self.model = model
        self.base_url = base_url.rstrip("/")
        self.url = f"{self.base_url}/chat/completions"
        self.supports_structured_output = structured_output
        key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY", "")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.AsyncClient(headers=headers, timeout=timeout_s)

    def request_body(self, messages: list[dict[str, str]], settings: SamplingSettings) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": settings.max_tokens,
            "temperature": settings.temperature,
            "top_p": settings.top_p,
        }
        if settings.seed is not None:
            body["seed"] = settings.seed
        if settings.stop:
            body["stop"] = list(settings.stop)
        if settings.json_schema is not None and self.supports_structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": settings.json_schema, "strict": True},
            }
        return body

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        try:
            response = await self._client.post(self.url, json=self.request_body(messages, settings))
        except httpx.TimeoutException:
            raise EngineUnavailableError(
                f"OpenAI-compatible endpoint {self.url} timed out; check the server or raise timeout_s"
            ) from None
        except httpx.HTTPError as err:
            raise EngineUnavailableError(
                f"cannot reach OpenAI-compatible endpoint {self.url} ({type(err).__name__}); "
                "check base_url and that the server is running"
            ) from None
        if response.status_code != 200:
            raise EngineUnavailableError(
                f"OpenAI-compatible endpoint {self.url} answered HTTP {response.status_code}: "
                f"{_error_message(response)}"
            )
        try:
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            raise EngineUnavailableError(
                f"OpenAI-compatible endpoint {self.url} returned a body without choices[0].message.content"
            ) from None
        return Generation(
            prompt_ids=[],
            token_ids=[],
            logprobs=[],
            text=text,
            finish_reason=str(choice.get("finish_reason") or "stop"),
            policy_version=self.policy_version,
        )

    async def close(self) -> None:
        await self._client.aclose()


def _error_message(response: httpx.Response) -> str:
    """The server's own error message, on one line and short."""
    try:
        data = response.json()
        message = data.get("error", {}).get("message") if isinstance(data.get("error"), dict) else data.get("error")
        text = str(message or data)
    except ValueError:
        text = response.text
    return " ".join(text.split())[:200] or "(empty body)"
