"""The prompt formats qlc renders rows with: named instruction templates and the chat template
of the smoke mode's tokenizer. Data, not code: one place each."""

from __future__ import annotations

ALPACA_HEAD = "Below is an instruction that describes a task"
# name -> (prompt with input, prompt without input, text after the response)
INSTRUCTION_TEMPLATES: dict[str, tuple[str, str, str]] = {
    "alpaca": (
        ALPACA_HEAD + ", paired with an input that provides further context. Write a response "
        "that appropriately completes the request.\n\n### Instruction:\n{instruction}\n\n"
        "### Input:\n{input}\n\n### Response:\n",
        ALPACA_HEAD + ". Write a response that appropriately completes the request.\n\n"
        "### Instruction:\n{instruction}\n\n### Response:\n",
        "",
    ),
    "llama2": ("[INST] {instruction}\n\n{input} [/INST] ", "[INST] {instruction} [/INST] ", ""),
    "chatml": (
        "<|im_start|>user\n{instruction}\n\n{input}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_start|>user\n{instruction}<|im_end|>\n<|im_start|>assistant\n",
        "<|im_end|>\n",
    ),
}
# Llama 2's chat template, for the tokenizer the smoke mode trains itself.
SMOKE_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ bos_token + '[INST] <<SYS>>\\n' + message['content'] + '\\n<</SYS>>\\n\\n' }}"
    "{% elif message['role'] == 'user' %}"
    "{% if loop.index0 == 0 or messages[loop.index0 - 1]['role'] != 'system' %}"
    "{{ bos_token + '[INST] ' }}{% endif %}{{ message['content'].strip() + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'].strip() + ' ' + eos_token }}{% endif %}{% endfor %}"
)
