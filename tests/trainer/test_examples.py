"""Examples: rendered rows -> token ids and labels with the tiny model's real tokenizer (a Llama 2
style BPE that adds BOS): one BOS where the text brings its own, a trained EOS, prompts masked
for loss = "completion", truncation counted, and the data report of each split."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from trainer_support import TINY_DATA

from qlc.compiler.plan import DataPlan, Plan
from qlc.trainer.errors import UserError
from qlc.trainer.examples import prepare, prompt_ids, show_example, tokenize
from qlc.trainer.render import Rendered
from qlc.trainer.types import IGNORE_INDEX, label_tokens


def data_of(plan: Plan, **values: Any) -> DataPlan:
    return plan.data.model_copy(update=values)


def trained_text(example: dict[str, list[int]], tokenizer: Any) -> list[str]:
    """The runs of consecutive trained tokens, decoded."""
    runs: list[list[int]] = [[]]
    for tid, label in zip(example["input_ids"], example["labels"], strict=True):
        if label != IGNORE_INDEX:
            runs[-1].append(tid)
        elif runs[-1]:
            runs.append([])
    return [tokenizer.decode(run) for run in runs if run]


def test_guanaco_text_gets_one_bos_and_a_trained_eos(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    rows = [json.loads(line) for line in TINY_DATA.read_text(encoding="utf-8").splitlines()[:8]]
    data = data_of(tiny_plan, max_length=100_000)
    prepared = prepare(rows, data, tiny_tokenizer, "data.jsonl", "train")
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    assert prepared.report["doubled_bos_fixed"] == 8 and prepared.report["eos_appended"] == 0
    for row, example in zip(rows, prepared.examples, strict=True):
        ids, labels = example["input_ids"], example["labels"]
        assert ids[0] == bos and ids[1] != bos
        assert ids.count(bos) == row["text"].count("<s>")
        assert ids[-1] == eos and labels[-1] == eos
        assert labels == ids  # loss "all"


def test_a_text_without_eos_gets_a_trained_one(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    example, flags = tokenize(Rendered("hello there", [(0, 11)], "hello"), tiny_tokenizer)
    assert flags == {"doubled_bos": False, "eos_added": True}
    assert example["input_ids"][0] == tiny_tokenizer.bos_token_id
    assert example["input_ids"][-1] == example["labels"][-1] == tiny_tokenizer.eos_token_id


def test_instruction_masks_the_prompt_and_trains_response_and_eos(
    tiny_plan: Plan, tiny_tokenizer: Any
) -> None:
    data = data_of(
        tiny_plan, format="instruction", loss="completion", input_field="input", max_length=1024
    )
    rows = [{"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"}]
    prepared = prepare(rows, data, tiny_tokenizer, "data.jsonl", "train")
    (example,), (rendered,) = prepared.examples, prepared.rendered
    assert "### Input:\n2 and 3" in rendered.text and rendered.text.endswith("### Response:\n5")
    assert trained_text(example, tiny_tokenizer) == ["5</s>"]
    report = prepared.report
    assert report["eos_appended"] == 1 and report["trained_tokens"] == 2
    prompt_len = len(tiny_tokenizer(rendered.prompt)["input_ids"])
    assert all(label == IGNORE_INDEX for label in example["labels"][:prompt_len])


def test_instruction_without_input_uses_the_short_template(
    tiny_plan: Plan, tiny_tokenizer: Any
) -> None:
    data = data_of(
        tiny_plan,
        format="instruction",
        loss="all",
        input_field="input",
        template="chatml",
        prompt_field="q",
        response_field="a",
    )
    prepared = prepare([{"q": "Say hi.", "input": "", "a": "hi"}], data, tiny_tokenizer, "d", "t")
    (example,), (rendered,) = prepared.examples, prepared.rendered
    assert (
        rendered.text
        == "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\nhi<|im_end|>\n"
    )
    assert all(label != IGNORE_INDEX for label in example["labels"])


def test_chat_trains_every_assistant_turn_only(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    data = data_of(tiny_plan, format="chat", loss="completion", messages_field="conv")
    conv = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Bye?"},
        {"role": "assistant", "content": "Bye."},
    ]
    prepared = prepare([{"conv": conv}], data, tiny_tokenizer, "chat.jsonl", "train")
    (example,), (rendered,) = prepared.examples, prepared.rendered
    ids = example["input_ids"]
    assert ids.count(tiny_tokenizer.bos_token_id) == rendered.text.count("<s>") == 2
    assert ids[0] == tiny_tokenizer.bos_token_id and ids[1] != tiny_tokenizer.bos_token_id
    assert [run.strip() for run in trained_text(example, tiny_tokenizer)] == [
        "Hello. </s>",
        "Bye. </s>",
    ]
    assert rendered.prompt.endswith("Bye? [/INST]")
    assert prepared.report["eos_appended"] == 0


def test_chat_without_a_template_is_an_error(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    tokenizer = copy.deepcopy(tiny_tokenizer)
    tokenizer.chat_template = None
    with pytest.raises(UserError, match=r'data\.format = "chat" but the tokenizer has no chat'):
        prepare([{"messages": []}], data_of(tiny_plan, format="chat"), tokenizer, "d", "train")


def test_all_masked_and_nothing_left_are_errors(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    data = data_of(tiny_plan, format="instruction", loss="completion", max_length=8)
    rows = [{"instruction": "A long instruction that fills the window", "output": "ok"}]
    with pytest.raises(UserError, match="no train example is left after truncating to data"):
        prepare(rows, data, tiny_tokenizer, "d", "train")
    data = data_of(
        tiny_plan, format="instruction", loss="completion", max_length=20, template="llama2"
    )
    rows = [{"instruction": "Short.", "output": "yes"}]  # 14 tokens and EOS
    rows.append({"instruction": "A long instruction that fills the whole window", "output": "ok"})
    prepared = prepare(rows, data, tiny_tokenizer, "d", "train")
    assert prepared.report["dropped_fully_masked"] == 1 and prepared.report["truncated"] == 1
    assert prepared.report["examples"] == 1 and prepared.rendered[0].text.endswith("yes")


def test_truncation_is_counted_and_keeps_max_length(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    rows = [{"text": "<s>[INST] hello there [/INST] " + "word " * 40 + "</s>"}, {"text": "hi"}]
    prepared = prepare(rows, data_of(tiny_plan, max_length=16), tiny_tokenizer, "d", "train")
    assert len(prepared.examples[0]["input_ids"]) == 16 and prepared.report["truncated"] == 1
    assert prepared.report["longest"] == 16 and prepared.report["examples"] == 2


def test_the_report_counts_rows_without_text(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    rows = [{"text": "one"}, {"text": None}, {"text": "three"}, {"text": ""}, {"text": "five"}]
    report = prepare(rows, tiny_plan.data, tiny_tokenizer, "d", "train").report
    assert report["rows"] == 5 and report["examples"] == 3
    assert report["rows_without_text"] == 2
    assert report["rows_without_text_by_reason"] == {
        "'text' is null": [2],
        "'text' is an empty string": [4],
    }
    assert report["trained_tokens"] == report["tokens"]


def test_example_display_marks_masked_tokens(tiny_plan: Plan, tiny_tokenizer: Any) -> None:
    data = data_of(tiny_plan, format="instruction", loss="completion", max_length=1024)
    prepared = prepare(
        [{"instruction": "Say yes.", "output": "yes"}], data, tiny_tokenizer, "d", "train"
    )
    shown = show_example(prepared.rendered[0], prepared.examples[0], tiny_tokenizer)
    assert "'<s>'~" in shown and "'</s>'~" not in shown and "'</s>'" in shown


def test_prompt_ids_keep_one_bos_and_no_eos(tiny_tokenizer: Any) -> None:
    bos, eos = tiny_tokenizer.bos_token_id, tiny_tokenizer.eos_token_id
    with_bos = prompt_ids(tiny_tokenizer, "<s>[INST] hi [/INST]")
    assert with_bos[0] == bos and with_bos[1] != bos and eos not in with_bos
    assert prompt_ids(tiny_tokenizer, "[INST] hi [/INST]") == with_bos


def test_label_tokens_count_what_carries_loss_once_shifted() -> None:
    assert label_tokens({"input_ids": [1, 2, 3, 4], "labels": [1, IGNORE_INDEX, 3, 4]}) == 2
