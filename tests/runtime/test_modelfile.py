"""The Ollama template is derived from the training render and checked against it."""

from __future__ import annotations

import pytest

from qlc.runtime.modelfile import (
    ModelfileError,
    check_template,
    derive_template,
    modelfile_text,
    stop_tokens,
)

PROMPTS = ["What is 2 + 2?", "Name three rivers.", 'Quote "this" {{ please }}']


def llama2_chat(prompt: str) -> str:
    """The tiny tokenizer's chat template on one user turn, as training renders a prompt."""
    return f"<s>[INST] {prompt.strip()} [/INST]"


def test_a_chat_render_becomes_literal_text_around_the_prompt() -> None:
    template = derive_template(llama2_chat, "<s>", gguf_adds_bos=True)
    assert template.go_template() == "[INST] {{ .Prompt }} [/INST]"
    assert template.dropped_bos  # llama.cpp adds it, as training's single BOS
    check_template(template, llama2_chat, PROMPTS, "<s>")
    kept = derive_template(llama2_chat, "<s>", gguf_adds_bos=False)
    assert kept.go_template() == "<s>[INST] {{ .Prompt }} [/INST]" and not kept.dropped_bos


def test_raw_text_is_the_prompt_alone_and_braces_are_escaped() -> None:
    assert derive_template(lambda p: p, "<s>", True).go_template() == "{{ .Prompt }}"
    braces = derive_template(lambda p: "{{sys}} " + p, None, True)
    assert braces.go_template() == '{{ "{{" }}sys}} {{ .Prompt }}'


def test_renders_the_template_cannot_express_are_refused() -> None:
    with pytest.raises(ModelfileError, match="exactly once"):
        derive_template(lambda p: p + p, None, True)
    with pytest.raises(ModelfileError, match="renders"):
        check_template(derive_template(llama2_chat, "<s>", True), llama2_chat, ["  x  "], "<s>")
    with pytest.raises(ModelfileError, match='"""'):
        modelfile_text("m.gguf", derive_template(lambda p: '"""' + p, None, True), [])


def test_modelfile_and_stop_tokens() -> None:
    stops = stop_tokens("</s>", " <|im_end|>\n", ["<s>", "</s>", "<|im_end|>", "<unk>"])
    assert stops == ["</s>", "<|im_end|>"]
    text = modelfile_text("model-q8_0.gguf", derive_template(llama2_chat, "<s>", True), stops)
    assert text == (
        "FROM ./model-q8_0.gguf\n"
        'TEMPLATE """[INST] {{ .Prompt }} [/INST]"""\n'
        'PARAMETER stop "</s>"\n'
        'PARAMETER stop "<|im_end|>"\n'
    )
