"""Each input shape rendered and masked by the trainer's own code with the tiny model's
tokenizer: Alpaca with and without input, OpenAI messages, ShareGPT turns through the role
mapping, multi-turn conversations with the loss on every assistant turn, the chat-template
override (inside the tokenizer's sandboxed Jinja), and templates that cannot give the mask."""

from __future__ import annotations

import json
from typing import Any

import pytest
from data_support import CHATML, plan_of, sharegpt_rows, tiny_tokenizer

from qlc.compiler.plan import DataPlan
from qlc.trainer.errors import UserError
from qlc.trainer.examples import encode, prepare
from qlc.trainer.formats import INSTRUCTION_TEMPLATES
from qlc.trainer.render import messages_of, render_row, unusable, usable_rows
from qlc.trainer.types import IGNORE_INDEX


def data_of(lines: str) -> DataPlan:
    return plan_of(lines).data


def trained_text(data: DataPlan, row: dict[str, Any], tokenizer: Any) -> list[str]:
    """The text of each run of trained tokens, as the labels say (the tokens, decoded)."""
    rendered = render_row(row, data, 1, tokenizer)
    example = encode(rendered, tokenizer).example
    runs: list[list[int]] = []
    previous = False
    for tid, label in zip(example["input_ids"], example["labels"], strict=True):
        trained = label != IGNORE_INDEX
        if trained and not previous:
            runs.append([])
        if trained:
            runs[-1].append(tid)
        previous = trained
    return [tokenizer.decode(ids) for ids in runs]


def test_alpaca_with_and_without_input_trains_the_response_only() -> None:
    tokenizer = tiny_tokenizer()
    data = data_of(
        'path = "d.jsonl"\nformat = "instruction"\ninput_field = "input"\nloss = "completion"'
    )
    with_input = {"instruction": "Add them.", "input": "2 and 3", "output": "5"}
    without = {"instruction": "Say hi.", "input": "", "output": "Hi!"}
    first, second = (
        render_row(with_input, data, 1, tokenizer),
        render_row(without, data, 2, tokenizer),
    )
    with_template, without_template, _ = INSTRUCTION_TEMPLATES["alpaca"]
    assert first.prompt == with_template.format(instruction="Add them.", input="2 and 3")
    assert second.prompt == without_template.format(instruction="Say hi.", input="")
    assert "### Input:" not in second.text  # an empty input is left out of the prompt
    assert trained_text(data, with_input, tokenizer) == ["5</s>"]
    assert trained_text(data, without, tokenizer) == ["Hi!</s>"]
    no_input_key = data_of('path = "d.jsonl"\nformat = "instruction"\nloss = "completion"')
    assert render_row(with_input, no_input_key, 1, tokenizer).prompt.count("2 and 3") == 0


def test_multi_turn_chat_trains_every_assistant_turn_and_nothing_else() -> None:
    tokenizer = tiny_tokenizer()
    data = data_of('path = "d.jsonl"\nformat = "chat"\nloss = "completion"')
    row = {
        "messages": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "Bye now"},
            {"role": "assistant", "content": "Goodbye."},
        ]
    }
    assert [t.strip() for t in trained_text(data, row, tokenizer)] == [
        "Hello. </s>",
        "Goodbye. </s>",
    ]
    everything = data_of('path = "d.jsonl"\nformat = "chat"\nloss = "all"')
    assert len(trained_text(everything, row, tokenizer)) == 1  # one run: every token


def test_sharegpt_turns_render_as_the_same_openai_messages() -> None:
    tokenizer = tiny_tokenizer()
    sharegpt = data_of('path = "d.jsonl"\nformat = "sharegpt"\nloss = "completion"')
    chat = data_of('path = "d.jsonl"\nformat = "chat"\nloss = "completion"')
    row = sharegpt_rows(1)[0]
    messages = messages_of(row, sharegpt)
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    as_chat = render_row({"messages": messages}, chat, 1, tokenizer)
    assert render_row(row, sharegpt, 1, tokenizer) == as_chat
    assert [t.strip() for t in trained_text(sharegpt, row, tokenizer)] == ["0. </s>", "0. </s>"]


def test_sharegpt_roles_map_other_speakers_and_name_unmapped_ones() -> None:
    mapped = data_of(
        'path = "d.jsonl"\nformat = "sharegpt"\nmessages_field = "turns"\n'
        'roles = { bot = "assistant", person = "user" }'
    )
    row = {"turns": [{"from": "person", "value": "Hi"}, {"from": "bot", "value": "Hello"}]}
    assert unusable(row, mapped) is None
    assert [m["role"] for m in messages_of(row, mapped)] == ["user", "assistant"]
    plain = data_of('path = "d.jsonl"\nformat = "sharegpt"\nmessages_field = "turns"')
    assert unusable(row, plain) == (
        "'turns' holds a turn whose 'from' is 'person', which data.roles does not map (it maps "
        "gpt, human, system)"
    )
    assert unusable({"turns": [{"from": "human"}]}, plain) == (
        "'turns' holds a turn without a text 'value'"
    )
    only_user = {"turns": [{"from": "human", "value": "Hi"}]}
    assert unusable(only_user, plain) == "'turns' has no assistant message with text to learn from"


def test_a_wrong_conversation_field_is_named_with_the_fields_present() -> None:
    data = data_of('path = "d.jsonl"\nformat = "sharegpt"')
    with pytest.raises(UserError) as raised:
        usable_rows([{"dialogue": []}] * 3, data, "d.jsonl", "train")
    assert "field 'conversations'" in str(raised.value) and "'dialogue'" in str(raised.value)


def test_chat_template_override_renders_masks_the_header_and_is_kept() -> None:
    tokenizer = tiny_tokenizer(CHATML)
    assert tokenizer.chat_template == CHATML  # what the adapter's tokenizer saves
    data = data_of(
        f'path = "d.jsonl"\nformat = "chat"\nloss = "completion"\n'
        f"chat_template = {json.dumps(CHATML)}"
    )
    row = {
        "messages": [
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Yo"},
            {"role": "user", "content": "Again"},
            {"role": "assistant", "content": "Yo yo"},
        ]
    }
    rendered = render_row(row, data, 1, tokenizer)
    assert rendered.text.startswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nYo")
    # each turn's loss starts after the assistant header the generation prompt writes
    assert [rendered.text[a:b] for a, b in rendered.trained] == [
        "Yo<|im_end|>\n",
        "Yo yo<|im_end|>\n",
    ]
    assert rendered.prompt.endswith("<|im_start|>user\nAgain<|im_end|>\n<|im_start|>assistant\n")


def test_a_template_is_rendered_in_the_sandbox_never_as_qlc_code() -> None:
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    tokenizer = tiny_tokenizer(escape)
    data = data_of(f'path = "d.jsonl"\nformat = "chat"\nchat_template = {json.dumps(escape)}')
    row = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}
    with pytest.raises(UserError) as raised:
        render_row(row, data, 4, tokenizer)
    assert "row 4: the chat template failed" in str(raised.value)
    assert "unsafe" in str(raised.value).lower()  # jinja2's SecurityError, not Python's answer


def test_a_template_that_rewrites_earlier_turns_cannot_mask_and_names_the_alternatives() -> None:
    # the last assistant turn alone carries its reasoning (as reasoning models' templates do)
    rewriting = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if loop.last %} (final){% endif %}\n{% endfor %}"
    )
    tokenizer = tiny_tokenizer(rewriting)
    row = {
        "messages": [
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
            {"role": "assistant", "content": "d"},
        ]
    }
    completion = data_of(
        f'path = "d.jsonl"\nformat = "chat"\nloss = "completion"\n'
        f"chat_template = {json.dumps(rewriting)}"
    )
    with pytest.raises(UserError) as raised:
        render_row(row, completion, 1, tokenizer)
    assert 'use data.loss = "all"' in str(raised.value)
    assert "set data.chat_template" in str(raised.value)
    everything = data_of(
        f'path = "d.jsonl"\nformat = "chat"\nloss = "all"\nchat_template = {json.dumps(rewriting)}'
    )
    rendered = render_row(row, everything, 1, tokenizer)
    assert rendered.trained == [(0, len(rendered.text))]


def test_prepare_reports_full_lengths_before_the_cut() -> None:
    tokenizer = tiny_tokenizer()
    data = data_of('path = "d.jsonl"\nformat = "sharegpt"\nmax_length = 20')
    prepared = prepare(sharegpt_rows(4), data, tokenizer, "d.jsonl", "train")
    assert prepared.report["truncated"] == 4
    assert all(full > 20 for full in prepared.full_lengths)
    assert all(len(e["input_ids"]) == 20 for e in prepared.examples)
