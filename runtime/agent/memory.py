"""The agent's evolving memory: the ordered steps taken so far, and how prompts show them.

Every module reads the memory; only the agent loop writes it (one ``Step`` per turn). Prompts
must stay small for small planners (SmolLM2-135M has a few thousand tokens of context, and a
long prompt also slows every turn), so ``render_steps`` shows the most recent steps in full,
truncates long tool results, and shrinks older steps to one line once a character budget is
spent.

In a conversation the memory starts out *seeded* with the earlier chat turns (``history``): they
are context every module reads (``render_history``), not steps the agent took, so they are never
squeezed by the step budget; ``conversation.fit_conversation`` has already capped them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from flowlane.api.trajectory import Step
from flowlane.runtime.agent.conversation import ChatTurn, render_history


def truncate(text: str, max_chars: int) -> str:
    """``text`` cut to ``max_chars`` characters, marking the cut."""
    text = text.strip()
    if len(text) <= max_chars:
        return text
    return text[: max(0, max_chars - 15)].rstrip() + " ...[truncated]"


def render_step(step: Step, max_result_chars: int) -> str:
    status = "" if step.tool_ok else " (tool failed)"
    lines = [f"Step {step.turn} [{step.tool_name}] sub-goal: {truncate(step.sub_goal, 300)}"]
    if step.command and step.command != step.sub_goal:
        lines.append(f"  command: {truncate(step.command, 300)}")
    lines.append(f"  result{status}: {truncate(step.result, max_result_chars) or '(empty)'}")
    return "\n".join(lines)


def render_steps(steps: Sequence[Step], *, max_result_chars: int = 400, max_total_chars: int = 2000) -> str:
    """The steps as prompt text, newest in full, oldest squeezed to fit ``max_total_chars``."""
    if not steps:
        return "(no steps yet)"
    rendered: list[str] = []
    used = 0
    for step in reversed(steps):
        full = render_step(step, max_result_chars)
        if used + len(full) > max_total_chars and rendered:
            full = f"Step {step.turn} [{step.tool_name}] sub-goal: {truncate(step.sub_goal, 60)} (details omitted)"
        rendered.append(full)
        used += len(full) + 1
    return "\n".join(reversed(rendered))


@dataclass
class Memory:
    """The ordered record of steps one trajectory has taken, after the conversation it started in."""

    steps: list[Step] = field(default_factory=list)
    max_result_chars: int = 400
    max_total_chars: int = 2000
    history: tuple[ChatTurn, ...] = ()  # earlier chat turns, oldest first

    def add(self, step: Step) -> None:
        self.steps.append(step)

    def render(self) -> str:
        return render_steps(self.steps, max_result_chars=self.max_result_chars,
                            max_total_chars=self.max_total_chars)

    def render_history(self) -> str:
        """The earlier turns as prompt text; "" outside a conversation."""
        return render_history(self.history)

    def __len__(self) -> int:
        return len(self.steps)
