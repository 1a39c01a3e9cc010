"""Scoring schema-constrained planner turns under the grammar they were sampled with.

vLLM samples every planner turn under the planner's JSON schema: before each token its
structured-output backend (xgrammar) masks the logits of the tokens the schema does not allow at
that point, so the recorded sampling log-probs are under the *masked* distribution, normalised
over the allowed tokens only. Scoring the same tokens without the mask gives log-probs smaller by
the log of the allowed mass (at most 0), and ``exp(old - behaviour)`` would be that mass instead of
1 for a fresh sample: a biased truncated-importance weight.

``GrammarMasks`` replays the mask: it compiles the turn's schema with xgrammar exactly as vLLM's
xgrammar backend does (``TokenizerInfo.from_huggingface`` with the model's vocabulary size,
``compile_json_schema`` with ``any_whitespace=True``, vLLM's default), walks a ``GrammarMatcher``
over the response ids and records, per position, the tokens allowed before that token. The
learner sets the other logits to -inf before its log-softmax.

What it mirrors of vLLM (0.32, ``v1/structured_output``):

- the vocabulary is the model's (``config.vocab_size``: embedding rows, which may exceed the
  tokenizer's size); xgrammar never allows the rows past the tokenizer, and neither does this;
- the stop tokens are vLLM's ``all_stop_token_ids``: the tokenizer's EOS plus the
  ``eos_token_id`` of ``generation_config.json``. The grammar allows them once the JSON value is
  complete; the sampled EOS closes the turn (the matcher terminates) and is scored under that mask;
- after the matcher has terminated vLLM stops masking (a full bitmask), so any further position
  (there is none when generation ended at the stop token) is unmasked here too.

A turn whose tokens the grammar rejects (recorded under another schema or tokenizer) is scored
unmasked, with a warning: the mask of the positions after the rejection is unknown.

Compiled grammars are cached per (tokenizer directory, vocabulary size, schema); compiling the
planner's schema takes well under a second, replaying a turn about a millisecond per token.
"""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

#: Compiled grammars kept per process (a run sees one planner schema per tool set).
GRAMMAR_CACHE_SIZE = 64


@functools.lru_cache(maxsize=8)
def _tokenizer_setup(tokenizer_dir: str, vocab_size: int) -> tuple[Any, tuple[int, ...]]:
    """xgrammar's compiler for one tokenizer and vocabulary size, and the stop tokens vLLM uses."""
    import xgrammar as xgr
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
    return compiler, stop_token_ids(Path(tokenizer_dir), tokenizer.eos_token_id)


def stop_token_ids(model_dir: Path, eos_token_id: int | None) -> tuple[int, ...]:
    """vLLM's ``all_stop_token_ids`` without request stop ids: the tokenizer's EOS plus the
    generation config's ``eos_token_id`` (an int or a list)."""
    stops = {int(eos_token_id)} if eos_token_id is not None else set()
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        config = {}
    extra = config.get("eos_token_id")
    if isinstance(extra, int):
        stops.add(extra)
    elif isinstance(extra, list):
        stops.update(int(token) for token in extra)
    return tuple(sorted(stops))


@functools.lru_cache(maxsize=GRAMMAR_CACHE_SIZE)
def _compiled(tokenizer_dir: str, vocab_size: int, schema: str) -> Any:
    compiler, _ = _tokenizer_setup(tokenizer_dir, vocab_size)
    return compiler.compile_json_schema(schema, any_whitespace=True)


def unpack_bitmask(bitmask: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """xgrammar's packed bitmask (rows, ceil(V / 32)) int32 -> (rows, vocab_size) bool, True = allowed.

    Bit j of word i is token 32 * i + j (xgrammar's layout).
    """
    words = bitmask.numpy().astype("<i4", copy=False)
    bits = np.unpackbits(words.view(np.uint8), axis=1, bitorder="little")[:, :vocab_size]
    return torch.from_numpy(bits.astype(bool))


class GrammarMasks:
    """Per-token allowed-vocabulary masks of schema-constrained turns, replayed with xgrammar.

    ``tokenizer_dir`` is the model directory the rollouts' engine loaded its tokenizer from (the
    learner's model directory); ``vocab_size`` the width of the model's logits.
    """

    def __init__(self, tokenizer_dir: str | Path, vocab_size: int) -> None:
        self.tokenizer_dir = str(tokenizer_dir)
        self.vocab_size = int(vocab_size)

    def bitmask(self, json_schema: str, response_ids: Sequence[int]) -> torch.Tensor | None:
        """Packed allowed-token bitmask (len(response_ids), ceil(V / 32)) of one turn sampled under
        ``json_schema``; None when the grammar rejects the tokens (the turn is then unmasked)."""
        import xgrammar as xgr

        _, stops = _tokenizer_setup(self.tokenizer_dir, self.vocab_size)
        compiled = _compiled(self.tokenizer_dir, self.vocab_size, json_schema)
        matcher = xgr.GrammarMatcher(compiled, override_stop_tokens=list(stops) or None)
        bitmask = xgr.allocate_token_bitmask(len(response_ids), self.vocab_size)  # all allowed
        for position, token in enumerate(response_ids):
            if matcher.is_terminated():  # vLLM stops masking once the grammar has ended
                break
            matcher.fill_next_token_bitmask(bitmask, position)
            if not matcher.accept_token(int(token)):
                log.warning(
                    "a planner turn's token %d at position %d is not allowed by the JSON schema it was "
                    "recorded with; scoring the turn without the schema's mask (was it sampled with "
                    "another tokenizer or schema?)", int(token), position,
                )
                return None
        return bitmask

    def allowed(self, turns: Sequence[tuple[str, Sequence[int]]]) -> torch.Tensor | None:
        """The (sum of response lengths, V) bool mask of ``(json_schema, response_ids)`` turns laid
        end to end (the order of a micro-batch's scored tokens); True = allowed. Turns with an
        empty schema are unmasked (all True); None when no turn has a schema."""
        if not any(schema for schema, _ in turns):
            return None
        pieces = []
        for schema, response_ids in turns:
            bitmask = self.bitmask(schema, response_ids) if schema else None
            if bitmask is None:
                pieces.append(torch.ones(len(response_ids), self.vocab_size, dtype=torch.bool))
            else:
                pieces.append(unpack_bitmask(bitmask, self.vocab_size))
        return torch.cat(pieces)


def masked_log_softmax(logits: torch.Tensor, allowed: torch.Tensor | None) -> torch.Tensor:
    """log_softmax over the allowed tokens of each row (the others get -inf); plain when ``allowed`` is None."""
    if allowed is not None:
        logits = logits.masked_fill(~allowed.to(logits.device), float("-inf"))
    return torch.log_softmax(logits, dim=-1)
