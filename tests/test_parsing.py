"""Parsing of planner, verifier and executor outputs: every rung of the fallback ladder.

Inputs are the kinds of text small models actually produce: valid JSON, JSON in a code fence,
JSON followed by chatter, JSON cut off by max_tokens, the reference code's labelled format,
and garbage.
"""

from __future__ import annotations

from flowlane.api.trajectory import Step, Verdict
from flowlane.runtime.agent.memory import render_steps, truncate
from flowlane.runtime.agent.parsing import (
    ParseMethod,
    PlanStep,
    find_json_object,
    match_tool_name,
    parse_command,
    parse_labelled,
    parse_plan,
    parse_verdict,
)
from flowlane.runtime.agent.prompts import (
    Module,
    call_seed,
    command_fields,
    executor_messages,
    planner_messages,
    planner_schema,
    render_tool_card,
)

TOOLS = ["python", "search", "generator"]


# ---------------------------------------------------------------------------- find_json_object


def test_whole_text_json_is_json_method() -> None:
    assert find_json_object(' {"a": 1} \n') == ({"a": 1}, ParseMethod.JSON)


def test_fenced_json_is_extracted() -> None:
    text = 'Here is my plan:\n```json\n{"a": "b"}\n```\nDone.'
    assert find_json_object(text) == ({"a": "b"}, ParseMethod.EXTRACTED_JSON)


def test_json_followed_by_trailing_junk_is_extracted() -> None:
    assert find_json_object('{"a": [1, 2]} I hope this helps! {') == ({"a": [1, 2]}, ParseMethod.EXTRACTED_JSON)


def test_json_after_braces_in_prose_is_found() -> None:
    text = 'Use the set {x} then: {"tool": "python"}'
    assert find_json_object(text) == ({"tool": "python"}, ParseMethod.EXTRACTED_JSON)


def test_truncated_string_value_is_closed() -> None:
    expected = ({"a": "x", "b": "half a sent"}, ParseMethod.REPAIRED_JSON)
    assert find_json_object('{"a": "x", "b": "half a sent') == expected


def test_truncated_key_is_dropped_back_to_last_member() -> None:
    assert find_json_object('{"a": "x", "b": {"c": 1}, "tool_na') == (
        {"a": "x", "b": {"c": 1}},
        ParseMethod.REPAIRED_JSON,
    )


def test_truncated_after_colon_is_dropped_back_to_last_member() -> None:
    assert find_json_object('{"a": "x", "b": ') == ({"a": "x"}, ParseMethod.REPAIRED_JSON)


def test_text_without_braces_has_no_json() -> None:
    assert find_json_object("I will use python to compute it.") is None


def test_json_array_is_not_an_object() -> None:
    assert find_json_object('["python"]') is None


# ---------------------------------------------------------------------------- labelled text


def test_labelled_text_with_markdown_and_numbering() -> None:
    text = "1. **Justification:** needs arithmetic\n2. **Sub-Goal:** compute 17*23\n3. **Tool Name:** python\n"
    assert parse_labelled(text, {"sub_goal": ("Sub-Goal",), "tool_name": ("Tool Name",),
                                 "justification": ("Justification",)}) == {
        "justification": "needs arithmetic",
        "sub_goal": "compute 17*23",
        "tool_name": "python",
    }


def test_labelled_values_span_lines_until_next_label() -> None:
    text = "Context: line one\nline two\nTool: search"
    assert parse_labelled(text, {"context": ("Context",), "tool_name": ("Tool",)}) == {
        "context": "line one\nline two",
        "tool_name": "search",
    }


# ---------------------------------------------------------------------------- tool names


def test_tool_name_exact_up_to_case_and_separators() -> None:
    assert match_tool_name(" Python ", TOOLS) == ("python", True)


def test_tool_name_misspelt_matches_closest() -> None:
    assert match_tool_name("serach", TOOLS) == ("search", False)


def test_tool_name_with_reference_code_suffix_matches_contained_name() -> None:
    assert match_tool_name("Python_Coder_Tool", TOOLS) == ("python", False)


def test_tool_name_unrelated_matches_nothing() -> None:
    assert match_tool_name("calculator", TOOLS) == (None, False)


# ---------------------------------------------------------------------------- planner


def test_plan_valid_json_is_clean() -> None:
    text = '{"justification": "j", "context": "c", "sub_goal": "compute 2+2", "tool_name": "python"}'
    parsed = parse_plan(text, TOOLS)
    assert parsed.value == PlanStep("j", "c", "compute 2+2", "python")
    assert parsed.method is ParseMethod.JSON
    assert parsed.clean


def test_plan_fenced_json_is_clean() -> None:
    text = '```json\n{"justification": "", "context": "", "sub_goal": "find X", "tool_name": "search"}\n```'
    parsed = parse_plan(text, TOOLS)
    assert (parsed.value.tool_name, parsed.method, parsed.clean) == ("search", ParseMethod.EXTRACTED_JSON, True)


def test_plan_json_with_trailing_text_is_clean() -> None:
    text = '{"sub_goal": "find X", "tool_name": "search"}\nLet me know if you need more.'
    parsed = parse_plan(text, TOOLS)
    assert (parsed.value.sub_goal, parsed.value.tool_name, parsed.clean) == ("find X", "search", True)


def test_plan_truncated_before_tool_name_falls_back_to_mentioned_tool() -> None:
    text = '{"justification": "the search tool finds facts", "context": "", "sub_goal": "look up the capi'
    parsed = parse_plan(text, TOOLS)
    assert parsed.value == PlanStep("the search tool finds facts", "", "look up the capi", "search")
    assert parsed.method is ParseMethod.REPAIRED_JSON
    assert not parsed.clean


def test_plan_labelled_text_reference_format() -> None:
    text = "Justification: arithmetic\nContext: none\nSub-Goal: compute 6*7\nTool Name: Python_Coder_Tool"
    parsed = parse_plan(text, TOOLS)
    assert parsed.value == PlanStep("arithmetic", "none", "compute 6*7", "python")
    assert parsed.method is ParseMethod.LABELLED
    assert parsed.problems == ("tool name 'Python_Coder_Tool' matched to 'python'",)


def test_plan_unknown_tool_near_real_one_is_matched_but_not_clean() -> None:
    parsed = parse_plan('{"sub_goal": "s", "tool_name": "pyhton"}', TOOLS)
    assert parsed.value.tool_name == "python"
    assert parsed.problems == ("tool name 'pyhton' matched to 'python'",)
    assert not parsed.clean


def test_plan_unknown_tool_far_from_all_defaults_to_first_tool() -> None:
    parsed = parse_plan('{"sub_goal": "s", "tool_name": "calculator"}', TOOLS)
    assert parsed.value.tool_name == "python"
    assert parsed.problems == ("unknown tool name 'calculator', using 'python'",)


def test_plan_garbage_gives_default_step() -> None:
    parsed = parse_plan("lorem ipsum dolor", TOOLS, default_sub_goal="What is 2+2?")
    assert parsed.value == PlanStep("", "", "What is 2+2?", "python")
    assert parsed.method is ParseMethod.DEFAULT
    assert not parsed.clean


def test_plan_json_missing_fields_is_completed_from_labels() -> None:
    text = '{"justification": "j"}\nSub-Goal: find the year\nTool Name: search'
    parsed = parse_plan(text, TOOLS)
    assert parsed.value == PlanStep("j", "", "find the year", "search")
    assert parsed.method is ParseMethod.LABELLED


def test_plan_accepts_key_spelling_variants() -> None:
    parsed = parse_plan('{"Sub-Goal": "find it", "Tool Name": "search"}', TOOLS)
    assert (parsed.value.sub_goal, parsed.value.tool_name, parsed.clean) == ("find it", "search", True)


# ---------------------------------------------------------------------------- verifier


def test_verdict_json_stop_is_clean() -> None:
    parsed = parse_verdict('{"reason": "the result answers it", "conclusion": "STOP"}')
    assert (parsed.value.verdict, parsed.value.reason, parsed.clean) == (Verdict.STOP, "the result answers it", True)


def test_verdict_json_lowercase_sentence_is_read_but_not_clean() -> None:
    parsed = parse_verdict('{"reason": "r", "conclusion": "we should continue"}')
    assert parsed.value.verdict is Verdict.CONTINUE
    assert not parsed.clean


def test_verdict_boolean_stop_field() -> None:
    parsed = parse_verdict('{"stop": true, "reason": "done"}')
    assert (parsed.value.verdict, parsed.value.reason) == (Verdict.STOP, "done")


def test_verdict_labelled_reference_format() -> None:
    parsed = parse_verdict("Analysis: the memory has the number.\nConclusion: **STOP**")
    assert (parsed.value.verdict, parsed.value.reason, parsed.method) == (
        Verdict.STOP,
        "the memory has the number.",
        ParseMethod.LABELLED,
    )


def test_verdict_bare_keyword_uses_last_one() -> None:
    parsed = parse_verdict("Should we STOP? No, I think we must CONTINUE.")
    assert parsed.value.verdict is Verdict.CONTINUE
    assert not parsed.clean


def test_verdict_truncated_json_without_conclusion_defaults() -> None:
    parsed = parse_verdict('{"reason": "the result is not yet', default=Verdict.CONTINUE)
    assert (parsed.value.verdict, parsed.method) == (Verdict.CONTINUE, ParseMethod.DEFAULT)


def test_verdict_garbage_uses_given_default() -> None:
    parsed = parse_verdict("???", default=Verdict.STOP)
    assert (parsed.value.verdict, parsed.method, parsed.clean) == (Verdict.STOP, ParseMethod.DEFAULT, False)


# ---------------------------------------------------------------------------- executor


def test_command_json_is_clean() -> None:
    parsed = parse_command('{"command": "print(6*7)"}')
    assert (parsed.value, parsed.clean) == ("print(6*7)", True)


def test_command_uses_tool_schema_field_first() -> None:
    parsed = parse_command('{"query": "wrong", "code": "print(1)"}', ["code"])
    assert (parsed.value, parsed.clean) == ("print(1)", True)


def test_command_under_unexpected_key_is_used_but_not_clean() -> None:
    parsed = parse_command('{"program": "print(1)"}')
    assert (parsed.value, parsed.clean) == ("print(1)", False)


def test_command_code_fence_fallback() -> None:
    parsed = parse_command("Sure!\n```python\nprint(2 ** 10)\n```")
    assert (parsed.value, parsed.method) == ("print(2 ** 10)", ParseMethod.LABELLED)


def test_command_whole_text_fallback() -> None:
    parsed = parse_command("  capital of France  ")
    assert (parsed.value, parsed.method) == ("capital of France", ParseMethod.DEFAULT)


def test_command_empty_output_is_empty_default() -> None:
    parsed = parse_command("")
    assert (parsed.value, parsed.method, parsed.problems) == ("", ParseMethod.DEFAULT, ("empty output",))


# ---------------------------------------------------------------------------- prompts and memory


def test_planner_schema_restricts_tool_name_to_the_tools() -> None:
    schema = planner_schema(TOOLS)
    assert schema["properties"]["tool_name"]["enum"] == TOOLS
    assert schema["required"] == ["justification", "context", "sub_goal", "tool_name"]


def test_tool_card_renders_metadata_on_one_line() -> None:
    card = {"name": "search", "description": "Find passages.", "best_for": ["facts", "names"], "limitations": ""}
    assert render_tool_card(card) == "- search: Find passages. (best for: facts; names)"


def test_planner_prompt_has_tools_examples_then_the_request_with_question_last() -> None:
    cards = [{"name": n, "description": f"{n} tool"} for n in TOOLS]
    messages = planner_messages("What is 2+2?", "arithmetic", cards, "(no steps yet)", turn=2, max_turns=3)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert "- search: search tool" in messages[0]["content"]
    assert "one of: python, search, generator" in messages[0]["content"]
    assert messages[-1]["content"].splitlines() == [
        "Analysis: arithmetic",
        "Steps so far:",
        "(no steps yet)",
        "Question: What is 2+2?",
        "Turn 2 of 3. Plan the next step in JSON.",
    ]


def test_planner_examples_are_valid_plans_for_tools_in_the_set_only() -> None:
    cards = [{"name": "search", "description": "d"}, {"name": "calculator", "description": "d"}]
    messages = planner_messages("q", "", cards, "(no steps yet)", turn=1, max_turns=3)
    (example,) = [m["content"] for m in messages if m["role"] == "assistant"]
    parsed = parse_plan(example, ["search", "calculator"])
    assert (parsed.value.tool_name, parsed.clean) == ("search", True)


def test_executor_prompt_names_the_tool_field_and_ends_with_the_sub_goal_and_format() -> None:
    card = {"name": "python", "description": "Runs code and more words the model would copy."}
    schema = {"properties": {"code": {"type": "string"}}, "required": ["code"]}
    messages = executor_messages(
        "What is 6*7?", card, "Write a program that prints the answer.", schema, sub_goal="Compute 6*7.", context=""
    )
    system, user = messages
    assert system["content"] == "You write one command for the python tool. Write a program that prints the answer."
    assert user["content"].splitlines() == [
        "Question: What is 6*7?", "Sub-goal: Compute 6*7.", "", 'Reply with JSON only: {"code": "..."}'
    ]
    assert "more words" not in str(messages)


def test_command_fields_put_required_first() -> None:
    schema = {"properties": {"timeout": {}, "code": {}}, "required": ["code"]}
    assert command_fields(schema) == ["code", "timeout"]


def test_call_seed_differs_per_module_and_turn_and_is_none_unseeded() -> None:
    seeds = {call_seed(7, module, turn) for module in Module for turn in range(3)}
    assert len(seeds) == len(Module) * 3
    assert call_seed(None, Module.PLANNER, 1) is None


def test_truncate_marks_the_cut() -> None:
    assert truncate("a" * 50, 30) == "a" * 15 + " ...[truncated]"


def test_render_steps_squeezes_old_steps_past_budget() -> None:
    steps = [Step(turn=i, tool_name="search", sub_goal=f"goal {i}", result="r" * 300) for i in (1, 2, 3)]
    text = render_steps(steps, max_result_chars=400, max_total_chars=700)
    lines = text.splitlines()
    assert lines[0] == "Step 1 [search] sub-goal: goal 1 (details omitted)"
    assert text.count("r" * 300) == 2
