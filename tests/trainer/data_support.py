"""What the input-shape, mixture and architecture tests share: plans made from spec text (as
the compiler makes them), the tiny model's tokenizer as the trainer loads it, JSON lines files."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from qlc.compiler.context import plan_spec
from qlc.compiler.plan import Plan
from qlc.trainer.model import ModelSource, load_tokenizer

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
TINY_MODEL = SPECS / "tiny" / "model"
TINY_DATA = SPECS / "tiny" / "data.jsonl"
HEAD = '[job]\nname = "t"\nseed = 3\n[model]\npath = "tiny/model"\n'
# ChatML with an assistant header that add_generation_prompt writes (Qwen's shape).
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def plan_of(data_toml: str, extra: str = "", head: str = HEAD) -> Plan:
    """The plan of a spec whose [data] section is `data_toml` (then `extra` sections)."""
    plan, _ = plan_spec((head + "[data]\n" + data_toml + "\n" + extra).encode(), "specs/t.toml")
    return plan


@cache
def tiny_tokenizer(chat_template: str | None = None) -> Any:
    """The tiny model's tokenizer as load_tokenizer makes it (data.chat_template applied)."""
    lines = 'path = "d.jsonl"\nformat = "chat"\n'
    if chat_template is not None:
        lines += f"chat_template = {json.dumps(chat_template)}\n"
    return load_tokenizer(plan_of(lines), ModelSource(str(TINY_MODEL), None, local=True))


def write_jsonl(path: Path, rows: list[Any]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def sharegpt_rows(count: int) -> list[dict[str, Any]]:
    """Two-turn conversations as ShareGPT {from, value} turns."""
    return [
        {
            "conversations": [
                {"from": "system", "value": "Answer with a number."},
                {"from": "human", "value": f"What is {i} plus {i}?"},
                {"from": "gpt", "value": f"{2 * i}."},
                {"from": "human", "value": "And that times two?"},
                {"from": "gpt", "value": f"{4 * i}."},
            ]
        }
        for i in range(count)
    ]
