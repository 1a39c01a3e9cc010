"""Laying planner turns out in micro-batches without spending compute on padding.

A Flow-GRPO update trains on many planner turns of very different lengths (a short first plan, a
long third one that carries the whole memory). Three layouts are supported; all are pure,
deterministic functions (a resumed run lays out the same data the same way) and all score only
the response tokens:

- ``padded``: turns sorted by length, longest first, fill micro-batches of rows while
  ``rows * longest <= token_budget``; each row is one turn, left-padded so all rows end together
  (the pad is masked). Sorting keeps the padding to a few percent, every row attends only over
  its own length, and the logits are computed only for the last ``longest response + 1``
  positions (``logits_to_keep``), i.e. for the response tokens, not the prompts. Works with every
  attention backend; the fastest on CPU when turns share no prefix (``bench/learner.py``).
- ``packed``: turns are laid end to end in one row (first-fit decreasing under the budget) with
  position ids restarting at 0 per turn and no attention mask; transformers derives a
  block-diagonal causal mask from the position ids. Zero padding, and with flash-attention the
  kernels are varlen so no attention is spent across turns; under sdpa (CPU) the mask is dense,
  so long packed rows pay quadratic attention on masked blocks.
- ``shared`` (the learner's default): turns are merged into a prefix tree (a trie over token ids) laid out in one row:
  a token sequence that several turns start with is run through the model once, and each token
  attends exactly to its own ancestors in the tree (a custom 4D boolean mask; position ids are
  depths). The log-probs and gradients are the same as running every turn alone, but planner
  turns share a lot: every turn starts with the same system prompt and worked examples, and the
  G trajectories of a group see the same first-turn prompt. On the planner's real turns this
  computes a fraction of the tokens (``bench/learner.py``); the dense mask costs quadratic
  attention in the number of tree nodes, so its token budget should stay around 1-2k.

A turn longer than the budget gets a micro-batch of its own (never dropped).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import torch


class BatchLayout(StrEnum):
    PADDED = "padded"
    PACKED = "packed"
    SHARED = "shared"


def plan_packed(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Packed layout: first-fit decreasing bins of total length <= ``token_budget`` (ties by index)."""
    _check_budget(token_budget)
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


def plan_padded(lengths: Sequence[int], token_budget: int) -> list[list[int]]:
    """Padded layout: longest first, a micro-batch grows while rows * its longest row <= budget."""
    _check_budget(token_budget)
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= token_budget:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def plan_shared(sequences: Sequence[Sequence[int]], token_budget: int) -> list[list[int]]:
    """Shared-prefix layout: sequences in lexicographic order fill a micro-batch while its prefix
    tree has at most ``token_budget`` nodes.

    In lexicographic order a sequence's longest common prefix with all earlier ones is the one
    with its predecessor, so each sequence adds ``len - common prefix`` nodes to the tree.
    """
    _check_budget(token_budget)
    order = sorted(range(len(sequences)), key=lambda i: (tuple(sequences[i]), i))
    batches: list[list[int]] = []
    nodes = 0
    previous: Sequence[int] = ()
    for index in order:
        sequence = sequences[index]
        added = len(sequence) - _common_prefix(previous, sequence)
        if batches and nodes + added <= token_budget:
            batches[-1].append(index)
            nodes += added
        else:
            batches.append([index])
            nodes = len(sequence)
        previous = sequence
    return batches


def plan_micro_batches(lengths: Sequence[int], token_budget: int, layout: BatchLayout) -> list[list[int]]:
    """Indices into ``lengths`` per micro-batch for the layouts that look only at lengths."""
    if layout == BatchLayout.SHARED:
        raise ValueError("the shared layout plans on token ids: use plan_sequences")
    return plan_packed(lengths, token_budget) if layout == BatchLayout.PACKED else plan_padded(lengths, token_budget)


def plan_sequences(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], token_budget: int, layout: BatchLayout
) -> list[list[int]]:
    """Indices into ``sequences`` (``(prompt_ids, response_ids)`` pairs) per micro-batch; every
    index appears exactly once."""
    if layout == BatchLayout.SHARED:
        return plan_shared([[*prompt, *response] for prompt, response in sequences], token_budget)
    return plan_micro_batches([len(p) + len(r) for p, r in sequences], token_budget, layout)


def _check_budget(token_budget: int) -> None:
    if token_budget <= 0:
        raise ValueError(f"token_budget must be > 0, got {token_budget}")


@dataclass(frozen=True)
class MicroBatch:
    """Model inputs for some turns, plus where their response tokens are scored.

    Shapes: input_ids, position_ids (B, L); attention_mask (B, L), (1, 1, L, L) (shared layout,
    True where a position may attend) or None; logit_index,
    target_ids, token_sequence (R,) with R the response tokens. Run the model with
    ``logits_to_keep``; flatten its logits to (B * K, vocab); row ``logit_index[k]`` predicts
    ``target_ids[k]``, which belongs to sequence ``token_sequence[k]`` (an index into the list
    that was laid out). ``real_tokens`` counts the prompt and response tokens of the sequences,
    ``input_ids.numel()`` the positions run through the model (with padding, without sharing).
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    logits_to_keep: int | torch.Tensor
    logit_index: torch.Tensor
    target_ids: torch.Tensor
    token_sequence: torch.Tensor
    real_tokens: int

    @property
    def computed_tokens(self) -> int:
        return int(self.input_ids.numel())


def _check_prompts(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> None:
    for index, (prompt, _) in enumerate(sequences):
        if not prompt:
            raise ValueError(f"sequence {index} has an empty prompt; its first token cannot be scored")


def pack_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> MicroBatch:
    """Packed layout of ``(prompt_ids, response_ids)`` pairs: one row, positions restart per pair."""
    _check_prompts(sequences)
    input_ids: list[int] = []
    position_ids: list[int] = []
    keep: list[int] = []
    target_ids: list[int] = []
    token_sequence: list[int] = []
    for index, (prompt, response) in enumerate(sequences):
        offset = len(input_ids)
        input_ids.extend(prompt)
        input_ids.extend(response)
        position_ids.extend(range(len(prompt) + len(response)))
        first = offset + len(prompt) - 1  # the last prompt position predicts the first response token
        keep.extend(range(first, first + len(response)))
        target_ids.extend(response)
        token_sequence.extend([index] * len(response))
    return MicroBatch(
        input_ids=torch.tensor([input_ids], dtype=torch.long),
        position_ids=torch.tensor([position_ids], dtype=torch.long),
        attention_mask=None,
        logits_to_keep=torch.tensor(keep, dtype=torch.long),
        logit_index=torch.arange(len(keep), dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        token_sequence=torch.tensor(token_sequence, dtype=torch.long),
        real_tokens=len(input_ids),
    )


def pad_sequences(sequences: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int = 0) -> MicroBatch:
    """Padded layout: one row per pair, left-padded so every row ends at column L - 1.

    The kept logits are the last K = (longest response + 1) columns; a row with a response of
    length r is scored at kept columns K - r - 1 .. K - 2 (the last column predicts past the end).
    """
    _check_prompts(sequences)
    width = max(len(p) + len(r) for p, r in sequences)
    kept = max(len(r) for _, r in sequences) + 1
    rows = len(sequences)
    input_ids = torch.full((rows, width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((rows, width), dtype=torch.long)
    logit_index: list[int] = []
    target_ids: list[int] = []
    token_sequence: list[int] = []
    for row, (prompt, response) in enumerate(sequences):
        length = len(prompt) + len(response)
        input_ids[row, width - length :] = torch.tensor([*prompt, *response], dtype=torch.long)
        attention_mask[row, width - length :] = 1
        start = row * kept + kept - len(response) - 1
        logit_index.extend(range(start, start + len(response)))
        target_ids.extend(response)
        token_sequence.extend([row] * len(response))
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    return MicroBatch(
        input_ids=input_ids,
        position_ids=position_ids,
        attention_mask=attention_mask,
        logits_to_keep=kept,
        logit_index=torch.tensor(logit_index, dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        token_sequence=torch.tensor(token_sequence, dtype=torch.long),
        real_tokens=int(attention_mask.sum().item()),
    )


def share_prefixes(sequences: Sequence[tuple[Sequence[int], Sequence[int]]]) -> MicroBatch:
    """Shared-prefix layout: one row holding the prefix tree of the ``(prompt_ids, response_ids)`` pairs.

    Tree nodes are numbered in insertion order, so a node's ancestors come before it and the
    mask is lower triangular; row ``i`` of the mask is its parent's row plus ``i`` itself.
    """
    _check_prompts(sequences)
    tokens: list[int] = []
    parent: list[int] = []
    depth: list[int] = []
    children: list[dict[int, int]] = [{}]  # children[0] is the root's; node i's are children[i + 1]
    paths: list[list[int]] = []
    for prompt, response in sequences:
        node, path = -1, []
        for token in (*prompt, *response):
            known = children[node + 1].get(token)
            if known is None:
                known = len(tokens)
                children[node + 1][token] = known
                tokens.append(token)
                parent.append(node)
                depth.append(depth[node] + 1 if node >= 0 else 0)
                children.append({})
            node = known
            path.append(node)
        paths.append(path)
    size = len(tokens)
    mask = torch.zeros((size, size), dtype=torch.bool)
    for node, up in enumerate(parent):
        if up >= 0:
            mask[node, : up + 1] = mask[up, : up + 1]
        mask[node, node] = True
    scored: list[int] = []
    target_ids: list[int] = []
    token_sequence: list[int] = []
    for index, ((prompt, response), path) in enumerate(zip(sequences, paths, strict=True)):
        scored.extend(path[len(prompt) - 1 : len(prompt) + len(response) - 1])
        target_ids.extend(response)
        token_sequence.extend([index] * len(response))
    keep = sorted(set(scored))
    column = {node: k for k, node in enumerate(keep)}
    return MicroBatch(
        input_ids=torch.tensor([tokens], dtype=torch.long),
        position_ids=torch.tensor([depth], dtype=torch.long),
        attention_mask=mask.view(1, 1, size, size),
        logits_to_keep=torch.tensor(keep, dtype=torch.long),
        logit_index=torch.tensor([column[node] for node in scored], dtype=torch.long),
        target_ids=torch.tensor(target_ids, dtype=torch.long),
        token_sequence=torch.tensor(token_sequence, dtype=torch.long),
        real_tokens=sum(len(p) + len(r) for p, r in sequences),
    )


def lay_out(
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]], layout: BatchLayout, pad_id: int = 0
) -> MicroBatch:
    """The micro-batch of ``sequences`` in ``layout``."""
    if layout == BatchLayout.SHARED:
        return share_prefixes(sequences)
    return pack_sequences(sequences) if layout == BatchLayout.PACKED else pad_sequences(sequences, pad_id)
