"""A chat conversation as the agent reads it: instructions, earlier turns, the question to answer.

A served agent is asked inside a conversation ("what is 17 * 23?" ... "and now divide that by
3"): the last user message only makes sense with the turns before it, and a system message says
how the answer should look. ``Conversation`` carries the three parts separately because each
module uses them differently:

- the **question** (last user message) is what the agent answers; every module sees it;
- the **earlier turns** seed the agent's memory as context: the query analysis, planner, executor,
  verifier and generator prompts all show them ahead of the steps, so "that" can be resolved;
- the **instructions** (system and developer messages) go to the planner and the generator, the
  two modules that decide what to do and what the answer looks like.

Prompts must stay inside the engine's context (``maxModelLen``), so ``fit_conversation`` caps the
conversation's tokens: the **oldest earlier turns are dropped** (whole turns, never cut mid-text),
until the rest fits. Dropping rather than summarising is deliberate: a summary costs one more
generation per request, and a small fixed model summarises unreliably, while the newest turns are
the ones a follow-up question refers to. Instructions and the question are never dropped: when
they alone exceed the cap, the conversation cannot be served (``ConversationTooLong``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum

from flowlane.api.errors import FlowlaneError

#: Counts the tokens of a text; ``estimate_tokens`` when no tokenizer is at hand.
TokenCounter = Callable[[str], int]
#: Characters per token assumed without a tokenizer: English BPE averages ~4, so 3 over-counts.
CHARS_PER_TOKEN_ESTIMATE = 3
#: Tokens one rendered turn adds beyond its text ("User: ", the newline).
TURN_OVERHEAD_TOKENS = 3
#: Characters of one earlier turn shown in a prompt; longer turns keep their beginning and end.
MAX_TURN_CHARS = 1200


class Speaker(StrEnum):
    USER = "user"
    ASSISTANT = "assistant"


@dataclass(frozen=True)
class ChatTurn:
    """One earlier message of the conversation."""

    speaker: Speaker
    text: str


@dataclass(frozen=True)
class Conversation:
    """What a chat request gives the agent besides its question."""

    question: str
    instructions: str = ""  # system/developer messages, joined
    history: tuple[ChatTurn, ...] = field(default_factory=tuple)  # earlier turns, oldest first
    dropped_turns: int = 0  # earlier turns left out by ``fit_conversation``

    @property
    def empty(self) -> bool:
        return not self.instructions.strip() and not self.history


class ConversationTooLong(FlowlaneError):
    """The instructions and the question alone take more tokens than the cap allows."""

    def __init__(self, tokens: int, max_tokens: int) -> None:
        super().__init__(f"the system message and the last user message take {tokens} tokens; at most "
                         f"{max_tokens} fit in the agent's prompts (shorten them)")
        self.tokens = tokens
        self.max_tokens = max_tokens


def estimate_tokens(text: str) -> int:
    return math.ceil(len(text) / CHARS_PER_TOKEN_ESTIMATE)


def clip_turn(text: str, max_chars: int = MAX_TURN_CHARS) -> str:
    """A long turn's beginning and end (a question's end is usually what a follow-up refers to)."""
    text = " ".join(text.split())
    if len(text) <= max_chars:
        return text
    half = (max_chars - 5) // 2
    return f"{text[:half]} ... {text[-half:]}"


def render_history(history: Sequence[ChatTurn]) -> str:
    """Earlier turns as prompt text, one line each: ``User: ...`` / ``Assistant: ...``."""
    return "\n".join(f"{turn.speaker.value.capitalize()}: {clip_turn(turn.text)}" for turn in history)


def fit_conversation(conversation: Conversation, max_tokens: int, count: TokenCounter = estimate_tokens
                     ) -> Conversation:
    """``conversation`` with its oldest earlier turns dropped until it takes at most ``max_tokens``.

    After a drop the kept history starts with a user turn (an assistant reply without the message
    it answered only confuses). Raises ``ConversationTooLong`` when the instructions and the
    question alone are over the cap.
    """
    fixed = count(conversation.instructions) + count(conversation.question) if conversation.instructions else \
        count(conversation.question)
    if fixed > max_tokens:
        raise ConversationTooLong(fixed, max_tokens)
    costs = [count(clip_turn(turn.text)) + TURN_OVERHEAD_TOKENS for turn in conversation.history]
    start = 0
    while start < len(costs) and fixed + sum(costs[start:]) > max_tokens:
        start += 1
    if start:
        while start < len(costs) and conversation.history[start].speaker is not Speaker.USER:
            start += 1
    if not start:
        return conversation
    return replace(conversation, history=conversation.history[start:],
                   dropped_turns=conversation.dropped_turns + start)
