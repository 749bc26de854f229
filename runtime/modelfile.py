"""An Ollama Modelfile whose TEMPLATE renders a prompt the way training rendered it.

The template is not translated from Jinja by hand: the training render (generate's
render_prompt: raw text, the instruction template, or the tokenizer's chat template with an
empty assistant turn) is applied to a sentinel prompt, and what surrounds the sentinel becomes
the literal text around `{{ .Prompt }}`. A text-format run gives `{{ .Prompt }}` alone.
Training's token rule drops a BOS the text already starts with when the tokenizer adds one;
llama.cpp (which Ollama runs) adds BOS when the GGUF says so, so a leading BOS text is left out
of the template then, giving the same ids. The translation is checked: substituting each
held-out prompt into the template must give the training render, exactly.

Stop tokens: the EOS token, and any special token that ends the assistant's turn in the
chat template (e.g. <|im_end|>, <|eot_id|>).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

SENTINEL = "QLC\u2063PROMPT\u2063SENTINEL"
PROMPT_ACTION = "{{ .Prompt }}"
LEFT_DELIM = "{{"


class ModelfileError(Exception):
    """The training render cannot be written as an Ollama template."""


def go_literal(text: str) -> str:
    """Text a Go template prints as it is: only "{{" opens an action, so it is escaped."""
    return text.replace(LEFT_DELIM, '{{ "{{" }}')


@dataclass(frozen=True)
class OllamaTemplate:
    prefix: str  # literal text before the prompt
    suffix: str  # literal text after it
    dropped_bos: bool

    def go_template(self) -> str:
        return go_literal(self.prefix) + PROMPT_ACTION + go_literal(self.suffix)

    def render(self, prompt: str) -> str:
        """What Ollama sends for `prompt` (the BOS that llama.cpp adds not included)."""
        return self.prefix + prompt + self.suffix


def derive_template(
    render: Callable[[str], str], bos_text: str | None, gguf_adds_bos: bool
) -> OllamaTemplate:
    rendered = render(SENTINEL)
    if rendered.count(SENTINEL) != 1:
        raise ModelfileError("the training template does not place the prompt exactly once")
    prefix, suffix = rendered.split(SENTINEL)
    dropped = bool(gguf_adds_bos and bos_text and prefix.startswith(bos_text))
    if dropped and bos_text:
        prefix = prefix[len(bos_text) :]
    return OllamaTemplate(prefix, suffix, dropped)


def check_template(
    template: OllamaTemplate, render: Callable[[str], str], prompts: list[str], bos_text: str
) -> None:
    for prompt in prompts:
        expected = render(prompt)
        got = (bos_text if template.dropped_bos else "") + template.render(prompt)
        if got != expected:
            raise ModelfileError(
                f"the Ollama template renders {prompt[:40]!r} as {got[:80]!r}, training as "
                f"{expected[:80]!r}"
            )


def stop_tokens(eos: str | None, assistant_end: str, special: list[str]) -> list[str]:
    stops = [eos] if eos else []
    stops += [token for token in special if token in assistant_end and token not in stops]
    return stops


def quoted(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile_text(gguf_name: str, template: OllamaTemplate, stops: list[str]) -> str:
    body = template.go_template()
    if '"""' in body:
        raise ModelfileError('the template holds """, which a Modelfile TEMPLATE cannot quote')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{body}"""']
    lines += [f"PARAMETER stop {quoted(stop)}" for stop in stops]
    return "\n".join(lines) + "\n"
