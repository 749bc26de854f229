"""Rendering: rows -> the text training sees and the spans that carry loss, one function per
data.format; rows without text counted and left out, and a dataset of mostly such rows, or a
field name no row has, stopped before training with the rows or the fields named (issue 19)."""

from __future__ import annotations

from typing import Any

import pytest

from qlc.compiler.plan import DataPlan, Plan
from qlc.trainer.errors import UserError
from qlc.trainer.render import (
    prompt_text,
    render_chat,
    render_instruction,
    render_row,
    render_text,
    unusable,
    usable_rows,
)


def data_of(plan: Plan, **values: Any) -> DataPlan:
    return plan.data.model_copy(update=values)


@pytest.fixture
def text_data(tiny_plan: Plan) -> DataPlan:
    return tiny_plan.data


@pytest.fixture
def instruction_data(tiny_plan: Plan) -> DataPlan:
    return data_of(tiny_plan, format="instruction", loss="completion", input_field="input")


@pytest.fixture
def chat_data(tiny_plan: Plan) -> DataPlan:
    return data_of(tiny_plan, format="chat", loss="completion", messages_field="conv")


# --- rows without text ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("value", "why"),
    [
        (None, "'text' is null"),
        (1.5, "'text' is a number"),
        (3, "'text' is a number"),
        (True, "'text' is a boolean"),
        ({"a": "b"}, "'text' is an object"),
        (["x"], "'text' is a list"),
        ("", "'text' is an empty string"),
        ("  \n ", "'text' is an empty string"),
    ],
)
def test_a_text_field_without_text_is_left_out_and_counted(
    text_data: DataPlan, value: Any, why: str
) -> None:
    rows = [{"text": "one"}, {"text": value}, {"text": "three"}]
    usable = usable_rows(rows, text_data, "data.jsonl", "train")
    assert usable.rows == [{"text": "one"}, {"text": "three"}] and usable.numbers == [1, 3]
    assert usable.dropped == {why: [2]} and usable.dropped_count == 1


def test_missing_fields_and_bad_inputs_in_some_rows_are_left_out(
    instruction_data: DataPlan,
) -> None:
    good = {"instruction": "Add.", "input": "2 and 3", "output": "5"}
    rows = [good, {"instruction": "Add."}, {**good, "input": 7}, {**good, "input": None}, good]
    usable = usable_rows(rows, instruction_data, "data.jsonl", "train")
    assert usable.numbers == [1, 4, 5]  # a null input is no input
    assert usable.dropped == {"no field 'output'": [2], "'input' is a number": [3]}


@pytest.mark.parametrize(
    ("conv", "why"),
    [
        (None, "'conv' is null"),
        ("hi", "'conv' is an empty string"),
        ([], "'conv' is an empty list"),
        ([{"role": "user"}], "'conv' holds a message without text content"),
        (["hi"], "'conv' holds a message without text content"),
        ([{"role": "bot", "content": "x"}], "'conv' holds a message whose role is not one of"),
        ([{"role": "user", "content": "x"}], "'conv' has no assistant message with text"),
        (
            [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}],
            "'conv' has no assistant message with text",
        ),
    ],
)
def test_a_conversation_without_an_answer_is_left_out(
    chat_data: DataPlan, conv: Any, why: str
) -> None:
    good = {"conv": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    usable = usable_rows([good, {"conv": conv}, good], chat_data, "chat.jsonl", "train")
    assert usable.numbers == [1, 3]
    ((reason, numbers),) = usable.dropped.items()
    assert reason.startswith(why) and numbers == [2]


def test_a_majority_without_text_stops_naming_the_rows(text_data: DataPlan) -> None:
    rows = [{"text": None}] * 3 + [{"text": ""}] * 5 + [{"text": "ok"}] * 8
    with pytest.raises(UserError) as caught:
        usable_rows(rows, text_data, "data.jsonl", "train")
    message = str(caught.value)
    assert message.startswith("data.jsonl: 8 of 16 train rows have no text to train on")
    assert "'text' is null: rows 1, 2, 3" in message
    assert "'text' is an empty string: rows 4, 5, 6, 7, 8)" in message
    assert "fix the data or the data.*_field keys" in message
    numbers = [2, 3, 5, 7]  # their places in the file (others held out for evaluation)
    with pytest.raises(UserError, match=r"'text' is a number: rows 3, 5, 7\)"):
        usable_rows([{"text": "ok"}] + [{"text": 1}] * 3, text_data, "d", "train", numbers)
    rows = [{"text": 1}] * 9 + [{"text": "ok"}] * 2
    with pytest.raises(UserError, match=r"rows 1, 2, 3, 4, 5 and 4 more"):
        usable_rows(rows, text_data, "data.jsonl", "eval")


def test_a_field_no_row_has_fails_listing_the_fields(
    text_data: DataPlan, instruction_data: DataPlan
) -> None:
    rows = [{"body": "x", "id": 1}] * 4
    with pytest.raises(UserError) as caught:
        usable_rows(rows, text_data, "data.jsonl", "train")
    assert str(caught.value) == (
        "data.jsonl: no train row has the field 'text' that data.format = 'text' reads "
        "(fields: 'body', 'id'): set the data.*_field keys of the spec"
    )
    rows = [{"instruction": "x", "answer": "y"}] * 4
    with pytest.raises(UserError, match=r"no train row has the field 'output' .*'answer'"):
        usable_rows(rows, instruction_data, "data.jsonl", "train")


def test_unusable_is_none_for_a_row_with_text(text_data: DataPlan) -> None:
    assert unusable({"text": "hello", "other": None}, text_data) is None


# --- rendering ----------------------------------------------------------------------------------


def test_text_is_trained_whole_and_its_prompt_ends_at_the_instruction(
    text_data: DataPlan,
) -> None:
    rendered = render_text({"text": "<s>[INST] hi [/INST] yo </s>  \n"}, text_data)
    assert rendered.text == "<s>[INST] hi [/INST] yo </s>"
    assert rendered.trained == [(0, len(rendered.text))]
    assert rendered.prompt == "<s>[INST] hi [/INST]"
    assert render_text({"text": "abcdef"}, text_data).prompt == "abc"  # no [/INST]: first half


@pytest.mark.parametrize(
    ("template", "with_input", "without_input"),
    [
        ("llama2", "[INST] Add.\n\n2 and 3 [/INST] 5", "[INST] Add. [/INST] 5"),
        (
            "chatml",
            "<|im_start|>user\nAdd.\n\n2 and 3<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n",
            "<|im_start|>user\nAdd.<|im_end|>\n<|im_start|>assistant\n5<|im_end|>\n",
        ),
    ],
)
def test_instruction_templates_with_and_without_input(
    instruction_data: DataPlan, template: str, with_input: str, without_input: str
) -> None:
    data = instruction_data.model_copy(update={"template": template})
    row = {"instruction": " Add. ", "input": "2 and 3", "output": "5\n"}
    assert render_instruction(row, data).text == with_input
    assert render_instruction({**row, "input": ""}, data).text == without_input
    assert render_instruction({**row, "input": None}, data).text == without_input


def test_alpaca_trains_the_response_only_with_loss_completion(
    instruction_data: DataPlan,
) -> None:
    row = {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}
    rendered = render_instruction(row, instruction_data)
    assert rendered.text.startswith("Below is an instruction that describes a task, paired")
    assert "### Input:\n2 and 3\n\n### Response:\n" in rendered.text
    assert rendered.prompt.endswith("### Response:\n") and rendered.text == rendered.prompt + "5"
    assert rendered.trained == [(len(rendered.prompt), len(rendered.text))]
    everything = render_instruction(row, instruction_data.model_copy(update={"loss": "all"}))
    assert everything.trained == [(0, len(everything.text))]
    no_input = render_instruction(row, instruction_data.model_copy(update={"input_field": None}))
    assert "### Input:" not in no_input.text  # input_field unset: the input is not read


def test_chat_marks_every_assistant_turn(chat_data: DataPlan, tiny_tokenizer: Any) -> None:
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    rendered = render_chat({"conv": conv}, chat_data, 1, tiny_tokenizer)
    assert rendered.text == (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi? [/INST] Hello. </s><s>[INST] Bye? [/INST]"
        " Bye. </s>"
    )
    assert [rendered.text[a:b] for a, b in rendered.trained] == [" Hello. </s>", " Bye. </s>"]
    assert rendered.prompt.endswith("<s>[INST] Bye? [/INST]")
    everything = render_chat(
        {"conv": conv}, chat_data.model_copy(update={"loss": "all"}), 1, tiny_tokenizer
    )
    assert everything.trained == [(0, len(everything.text))]


def test_a_failing_chat_template_names_the_row(chat_data: DataPlan, tiny_tokenizer: Any) -> None:
    conv = [{"role": "assistant", "content": "first"}, {"role": "assistant", "content": "again"}]
    with pytest.raises(UserError, match=r"row 12: the chat template failed: Conversation roles"):
        render_row({"conv": conv}, chat_data, 12, tiny_tokenizer)


def test_prompts_render_as_training_rendered_them(
    text_data: DataPlan, instruction_data: DataPlan, chat_data: DataPlan, tiny_tokenizer: Any
) -> None:
    assert prompt_text("<s>[INST] hi [/INST]", text_data, tiny_tokenizer) == "<s>[INST] hi [/INST]"
    alpaca = prompt_text("Say yes.", instruction_data, tiny_tokenizer)
    assert alpaca.endswith("### Instruction:\nSay yes.\n\n### Response:\n")
    assert prompt_text("Hi?", chat_data, tiny_tokenizer) == "<s>[INST] Hi? [/INST]"
