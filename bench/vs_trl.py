"""flowlane's Flow-GRPO next to TRL's GRPOTrainer: the same job, the same budget, one table.

The peer is what a user would pick instead: TRL's ``GRPOTrainer`` with its tool-calling support
(``tools=[python]``), on the same bundled SmolLM2-135M-Instruct, the same training questions in the
same order (the FlowRun's training split less its validation split, batched as its learner batches
them), the same group size and questions per step, the same learning rate, KL weight, clip range
and sampling temperature, the same tool-call budget (``maxTurns``), and the same 30-minute budget
for everything (the untrained evaluation, training, the trained evaluation). Both are scored on the
FlowRun's held-out test split with the same reward checker (``numeric``) and the same paired
statistics (``flowlane.kit.evalstats``).

- **flowlane**: ``flowlane run`` on the FlowRun file (default ``examples/flowrun.yaml``), as
  ``bench/flowrun.py --only learning`` runs it (the planner and its frozen modules on vLLM).
- **TRL**: this process. The model writes tool calls in the Qwen2.5 / Hermes format (SmolLM2's own
  chat template has no tool calls, so the tokenizer gets TRL's copy of the Qwen2.5 template, the
  one TRL parses); generation is TRL's default (transformers ``generate``: TRL's vLLM colocation
  needs CUDA). The python tool is flowlane's: each call runs in a sandbox server child with
  flowlane's limits, never in this process. Evaluation is greedy, up to ``maxTurns`` tool calls,
  the final assistant message scored. TRL's own defaults stand where the FlowRun has no
  counterpart (its ``dapo`` loss, group-scaled rewards); the learning-rate schedule is constant
  and weight decay 0.01, as flowlane's learner has them. Training stops after the FlowRun's
  ``schedule.steps`` or when the budget less one evaluation is spent, whichever comes first.

Run ``.venv/bin/python bench/vs_trl.py [--only flowlane,trl] [--config FILE]`` (the TRL side needs
``pip install -e '.[peer]'``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import common  # bench scripts run as files: see bench/common.py
import flowrun as flowrun_bench

from flowlane.kit.evalstats import PairedGain, paired_gain

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
BUDGET_S = 30 * 60
PARTS = ("flowlane", "trl")
#: What the TRL model is told. TRL renders the tool's signature into the template's tool section;
#: the example shows the call format, which the untrained 135M model otherwise never writes.
SYSTEM_PROMPT = (
    "You solve math problems. Compute with the python tool: call it with a program that prints the result, "
    'for example <tool_call>\n{"name": "python", "arguments": {"code": "print(12 * 34)"}}\n</tool_call>\n'
    "After the tool answers, reply with 'Answer: <number>'."
)
EVAL_BATCH = 16


@dataclass
class Side:
    """One trainer's row of the comparison."""

    trainer: str
    steps: int = 0
    before: dict[str, bool] = field(default_factory=dict)  # test question id -> correct (TRL side)
    after: dict[str, bool] = field(default_factory=dict)
    gain: PairedGain | None = None  # from before/after, or as the FlowRun logged it
    step_s: list[float] = field(default_factory=list)
    eval_s: list[float] = field(default_factory=list)
    tool_calls: list[float] = field(default_factory=list)  # per trajectory, untrained and trained
    wall_s: float = 0.0
    note: str = ""

    def row(self) -> dict[str, Any]:
        gain = self.gain
        return {
            "trainer": self.trainer, "steps": self.steps,
            "held-out untrained": gain.before if gain else None,
            "held-out trained": gain.after if gain else None,
            "gain (points)": 100 * gain.gain if gain else None,
            "gain 95% CI (points)": f"{100 * gain.ci_low:+.0f} to {100 * gain.ci_high:+.0f}" if gain else None,
            "fixed / broken": f"{gain.fixed} / {gain.broken}" if gain else None,
            "McNemar p": gain.p_value if gain else None,
            "median step s": statistics.median(self.step_s) if self.step_s else None,
            "test eval s untrained / trained": " / ".join(f"{s:.0f}" for s in self.eval_s) or None,
            "tool calls / traj. untrained / trained": " / ".join(f"{c:.2f}" for c in self.tool_calls) or None,
            "wall clock s": self.wall_s,
        }


# --- flowlane ----------------------------------------------------------------------------------


def run_flowlane(config: Path, workdir: Path, timeout_s: float) -> Side:
    result = flowrun_bench.run_flowrun("flowlane", config, workdir / "flowlane", timeout_s)
    side = Side("flowlane (Flow-GRPO, vLLM)", steps=len(result.values("time/step_s")),
                step_s=result.values("time/step_s"), eval_s=result.values("test/time_s"), wall_s=result.wall_s)
    logged = [result.last(f"test/{key}") for key in ("baseline_accuracy", "accuracy", "gain_fixed", "gain_broken",
                                                     "gain_ci_low", "gain_ci_high", "gain_p_value")]
    if all(value is not None for value in logged):
        before, after, fixed, broken, low, high, p_value = (float(v) for v in logged if v is not None)
        from flowlane.api.flowrun import load_flowrun

        side.gain = PairedGain(n=len(test_tasks(load_flowrun(config).spec)), before=before, after=after,
                               fixed=int(fixed), broken=int(broken), ci_low=low, ci_high=high, p_value=p_value)
    turns = [result.last("test/baseline_turns_per_trajectory"), result.last("test/turns_per_trajectory")]
    side.tool_calls = [t for t in turns if t is not None]  # one tool call per planner turn
    if result.returncode != 0:
        side.note = f"exit {result.returncode}"
    return side


def test_tasks(spec: Any) -> list[Any]:
    """The held-out test questions the FlowRun's learner scores before and after training."""
    from flowlane.trainer.learner_records import load_run_tasks

    schedule = spec.schedule
    tasks = load_run_tasks(schedule.eval_tasks or spec.tasks.dataset, schedule.eval_split, spec.tasks.reward.value)
    return tasks[: schedule.eval_limit] if schedule.eval_limit else tasks


# --- TRL ---------------------------------------------------------------------------------------


class SandboxedPython:
    """flowlane's python tool as the plain function TRL calls; the code runs in a sandbox child.

    TRL calls tools synchronously from its training loop; the sandbox client is asyncio, so it
    lives on an event loop of its own in a daemon thread.
    """

    def __init__(self) -> None:
        from flowlane.runtime.serving.sandbox import SandboxChild
        from flowlane.runtime.tools.python_tool import PythonTool

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="sandbox-client", daemon=True)
        self.thread.start()
        self.child = SandboxChild(max_concurrency=2)
        self._wait(self.child.start())
        self.tool = PythonTool(runner=self.child)
        self.calls = 0

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result()

    def function(self) -> Callable[[str], str]:
        def python(code: str) -> str:
            """Runs a Python 3 program in a sandbox and returns what it prints.

            Args:
                code: a complete Python 3 program that prints its result
            """
            self.calls += 1
            return self._wait(self.tool.execute(code)).output

        return python

    def close(self) -> None:
        self._wait(self.child.close())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=10)


def tool_calling_tokenizer(model_dir: Path) -> Any:
    """The model's tokenizer with the chat template TRL knows how to parse tool calls from."""
    import trl
    from transformers import AutoTokenizer
    from trl.chat_template_utils import add_response_schema

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokenizer.padding_side = "left"
    tokenizer.chat_template = (Path(trl.__file__).parent / "chat_templates" / "qwen2_5.jinja").read_text()
    return add_response_schema(tokenizer)


def prompt_messages(question: str) -> list[dict[str, str]]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def final_answer(messages: Sequence[dict[str, Any]]) -> str:
    """The text a trajectory ends with: its last assistant message's content."""
    for message in reversed(messages):
        if message.get("role") == "assistant":
            return str(message.get("content") or "")
    return ""


def greedy_tool_loop(model: Any, tokenizer: Any, python: Callable[[str], str], questions: Sequence[str],
                     max_calls: int, max_new_tokens: int) -> list[list[dict[str, Any]]]:
    """Each question's conversation: greedy turns, running the tool calls, up to ``max_calls`` of them."""
    import json

    import torch
    from trl.chat_template_utils import parse_response

    conversations: list[list[dict[str, Any]]] = [prompt_messages(q) for q in questions]
    open_ids = list(range(len(questions)))
    for round_index in range(max_calls + 1):
        if not open_ids:
            break
        still_open = []
        for start in range(0, len(open_ids), EVAL_BATCH):
            batch = open_ids[start:start + EVAL_BATCH]
            texts = [tokenizer.apply_chat_template(conversations[i], tools=[python], add_generation_prompt=True,
                                                   tokenize=False) for i in batch]
            encoded = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            with torch.no_grad():
                output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                                        pad_token_id=tokenizer.pad_token_id)
            for row, i in enumerate(batch):
                ids = [t for t in output[row, encoded.input_ids.shape[1]:].tolist() if t != tokenizer.pad_token_id]
                try:
                    message = parse_response(tokenizer, ids)
                except Exception:  # a malformed tool call: the text is the answer, as TRL would keep it
                    message = {"role": "assistant", "content": tokenizer.decode(ids, skip_special_tokens=True)}
                conversations[i].append(message)
                calls = message.get("tool_calls") or []
                if not calls or round_index == max_calls:
                    continue
                for call in calls:
                    function = call.get("function", {})
                    arguments = function.get("arguments") or {}
                    if isinstance(arguments, str):
                        try:
                            arguments = json.loads(arguments)
                        except ValueError:
                            arguments = {}
                    if function.get("name") == "python" and isinstance(arguments, dict) and "code" in arguments:
                        result = python(str(arguments["code"]))
                    else:
                        result = f"unknown tool call: {function.get('name')!r}"
                    conversations[i].append({"role": "tool", "name": function.get("name", ""), "content": result})
                still_open.append(i)
        open_ids = still_open
    return conversations


def tool_calls_per_conversation(conversations: Sequence[Sequence[dict[str, Any]]]) -> float:
    """Tool calls the model made per conversation (the prompt's messages not counted)."""
    start = len(prompt_messages(""))
    calls = sum(len(m.get("tool_calls") or []) for c in conversations for m in c[start:])
    return calls / max(len(conversations), 1)


def run_trl(config: Path, workdir: Path, budget_s: float) -> Side:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from flowlane.api.flowrun import load_flowrun
    from flowlane.kit.models import resolve_model
    from flowlane.kit.tasks import carve_validation
    from flowlane.runtime.rewards import score
    from flowlane.trainer.coordinator import question_batches
    from flowlane.trainer.learner_records import load_run_tasks

    started = time.monotonic()
    spec = load_flowrun(config).spec
    algo, schedule = spec.algorithm, spec.schedule
    train, _validation = carve_validation(load_run_tasks(spec.tasks.dataset, spec.tasks.split, spec.tasks.reward.value),
                                          schedule.validation_fraction, algo.seed)
    batches = question_batches(train, algo.batch_questions, schedule.steps, algo.seed)
    test = test_tasks(spec)
    by_id = {t.id: t for batch in batches for t in batch}

    model_dir = resolve_model(spec.model.planner)
    tokenizer = tool_calling_tokenizer(model_dir)
    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    sandbox = SandboxedPython()
    python = sandbox.function()
    side = Side("TRL GRPOTrainer (transformers generate)")

    def evaluate() -> None:
        model.eval()
        t0 = time.monotonic()
        conversations = greedy_tool_loop(model, tokenizer, python, [t.question for t in test], algo.max_turns,
                                         algo.max_planner_tokens)
        side.eval_s.append(time.monotonic() - t0)
        side.tool_calls.append(tool_calls_per_conversation(conversations))
        correct = {t.id: score(t.reward, final_answer(c), t) == 1.0 for t, c in zip(test, conversations, strict=True)}
        (side.after if side.before else side.before).update(correct)
        print(f"[trl] test accuracy {sum(correct.values()) / len(correct):.3f} in {side.eval_s[-1]:.0f} s, "
              f"{side.tool_calls[-1]:.2f} tool calls per question", flush=True)

    def reward(completions: list[list[dict[str, Any]]], task_id: list[str], **_: Any) -> list[float | None]:
        return [score(by_id[i].reward, final_answer(c), by_id[i]) for c, i in zip(completions, task_id, strict=True)]

    class Budget(TrainerCallback):
        """Times each step; stops when the rest of the budget would not cover the final evaluation."""

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.t0 = time.monotonic()

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            side.step_s.append(time.monotonic() - self.t0)
            print(f"[trl] step {state.global_step} in {side.step_s[-1]:.1f} s", flush=True)
            if time.monotonic() - started + side.eval_s[0] + statistics.median(side.step_s) > budget_s:
                print("[trl] budget: stopping before the next step", flush=True)
                control.should_training_stop = True

    try:
        evaluate()
        group = algo.group_size
        args = GRPOConfig(
            output_dir=str(workdir / "trl"), max_steps=schedule.steps, seed=algo.seed, use_cpu=True, bf16=False,
            # One optimizer step per generation batch of batchQuestions x G completions, in micro-batches of G.
            per_device_train_batch_size=group, gradient_accumulation_steps=algo.batch_questions,
            num_generations=group, shuffle_dataset=False,
            learning_rate=algo.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.01,
            beta=algo.kl_beta, epsilon=algo.clip_low, epsilon_high=algo.clip_high, temperature=algo.temperature,
            top_p=1.0, max_completion_length=algo.max_planner_tokens * algo.max_turns,
            max_tool_calling_iterations=algo.max_turns, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=True, dataloader_num_workers=0,
        )
        dataset = Dataset.from_list([{"prompt": prompt_messages(t.question), "task_id": t.id}
                                     for batch in batches for t in batch])
        trainer = GRPOTrainer(model=model, reward_funcs=[reward], args=args, train_dataset=dataset,
                              processing_class=tokenizer, tools=[python], callbacks=[Budget()])
        trainer.train()
        side.steps = trainer.state.global_step
        for entry in trainer.state.log_history:
            if "reward" in entry:
                print(f"[trl] step {entry.get('step')}: reward {entry['reward']:.3f}, "
                      f"tool calls {entry.get('tools/call_frequency', float('nan')):.2f}", flush=True)
        model = trainer.model
        evaluate()
        side.gain = paired_gain(side.before, side.after)
    finally:
        sandbox.close()
    side.wall_s = time.monotonic() - started
    return side


# --- the table ---------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    parser.add_argument("--config", default=str(flowrun_bench.DEFAULT_CONFIG), help="the FlowRun both train on")
    parser.add_argument("--budget-s", type=float, default=BUDGET_S, help="wall-clock budget of each side")
    parser.add_argument("--keep", action="store_true", help="keep the run directories")
    args = parser.parse_args(argv)
    parts = [p for p in args.only.split(",") if p]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"unknown parts {unknown}; choose from {', '.join(PARTS)}")
    config = Path(args.config).resolve()
    problem = flowrun_bench.check_runnable(config)
    if problem is not None:
        parser.error(f"{config}: {problem}")

    common.print_header("flowlane vs TRL GRPOTrainer", notes=[f"FlowRun: {config.name}",
                                                                 f"budget per side: {args.budget_s:.0f} s"])
    workdir = Path(tempfile.mkdtemp(prefix="flowlane-vs-trl-"))
    sides = []
    if "flowlane" in parts:
        # the flowlane side gets the budget plus a grace period to stop cleanly; overruns show in its wall clock
        sides.append(run_flowlane(config, workdir, args.budget_s + 600))
    if "trl" in parts:
        sides.append(run_trl(config, workdir, args.budget_s))
    rows = [side.row() for side in sides]
    print(f"\n### flowlane vs TRL ({config.name}, budget {args.budget_s / 60:.0f} min each)\n")
    print(common.markdown_table(rows, list(rows[0]), digits=3))
    for side in sides:
        if side.note:
            print(f"\n{side.trainer}: {side.note}")
    if args.keep:
        print(f"\nrun directories kept under {workdir}")
    else:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
