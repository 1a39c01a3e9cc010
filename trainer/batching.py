"""Packing planner turns into micro-batches without computing on padding.

A Flow-GRPO update trains on many planner turns of very different lengths (a short first plan, a
long third one that carries the whole memory). Padding them to a common length wastes compute on
pad tokens, so turns are *packed*: several sequences are laid end to end in one row, position ids
restart at 0 for each sequence, and no attention mask is passed. transformers then derives a
block-diagonal causal mask from the position ids (and flash-attention uses varlen kernels), so
each sequence attends only to itself and the logits equal those of running it alone.

Which turns share a micro-batch is a first-fit-decreasing bin packing under a token budget:
longest first, into the first micro-batch with room. A sequence longer than the budget gets a
micro-batch of its own (counted, never dropped). Everything here is pure and deterministic, so a
resumed run packs the same data the same way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


def plan_micro_batches(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Group sequence indices into micro-batches whose total length stays within ``token_budget``.

    First-fit decreasing (ties broken by index). Returns lists of indices into ``lengths``; every
    index appears exactly once. A sequence longer than the budget sits alone in its micro-batch.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: list[list[int]] = []
    room: list[int] = []
    for index in order:
        length = lengths[index]
        for slot, free in enumerate(room):
            if length <= free:
                bins[slot].append(index)
                room[slot] -= length
                break
        else:
            bins.append([index])
            room.append(token_budget - length)
    return bins


@dataclass(frozen=True)
class PackedBatch:
    """Sequences laid end to end in one row, plus where their response tokens are scored.

    Shapes: input_ids, position_ids (1, L); logit_positions, target_ids, token_sequence (R,),
    with L the packed length and R the number of response tokens. The logits at
    ``logit_positions[k]`` predict ``target_ids[k]``, the k-th response token, which belongs to
    sequence ``token_sequence[k]`` (an index into the list given to ``pack_sequences``).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    logit_positions: torch.Tensor
    target_ids: torch.Tensor
    token_sequence: torch.Tensor

    @property
    def total_tokens(self) -> int:
        return int(self.input_ids.shape[1])


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> PackedBatch:
    """Pack ``(prompt_ids, response_ids)`` pairs into one row.

    Each prompt must be non-empty: the first response token is predicted from the last prompt
    position.
    """
    input_ids: list[int] = []
    position_ids: list[int] = []
    logit_positions: list[int] = []
    target_ids: list[int] = []
    token_sequence: list[int] = []
    for index, (prompt, response) in enumerate(sequences):
        if not prompt:
            raise ValueError(f"sequence {index} has an empty prompt; its first token cannot be scored")
        offset = len(input_ids)
        input_ids.extend(prompt)
        input_ids.extend(response)
        position_ids.extend(range(len(prompt) + len(response)))
        first = offset + len(prompt) - 1
        logit_positions.extend(range(first, first + len(response)))
        target_ids.extend(response)
        token_sequence.extend([index] * len(response))
    return PackedBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        logit_positions=torch.tensor(logit_positions, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        token_sequence=torch.tensor(token_sequence, dtype=torch.long),
    )
