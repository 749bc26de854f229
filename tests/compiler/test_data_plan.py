"""The input shapes and architectures a spec can name, decided in the plan: ShareGPT roles and
the conversation field, mixtures of sources, the chat-template override, keys a format does not
read (warnings), each architecture's model types and fast-engine path, projection names."""

from __future__ import annotations

from typing import Any

import pytest

from qlc.compiler.context import plan_spec
from qlc.compiler.explain import input_json, input_lines, settings_lines
from qlc.compiler.load import SpecError
from qlc.compiler.plan import Plan
from qlc.compiler.resolve import ResolveError, resolve
from qlc.compiler.settle import FAST_UNMODELLED, MODEL_TYPES
from qlc.compiler.spec import Spec

BASE: dict[str, Any] = {
    "job": {"name": "t"},
    "model": {"id": "org/model"},
    "data": {"path": "d.jsonl", "format": "chat"},
}


def plan_with(**sections: dict[str, Any]) -> Plan:
    document = {**BASE, **{k: {**BASE.get(k, {}), **v} for k, v in sections.items()}}
    return resolve(
        Spec.model_validate(document),
        spec_name="x.toml",
        spec_sha256="0" * 64,
        qlc_version="0",
        lock=None,
    )


def spec_error(toml: str) -> str:
    with pytest.raises(SpecError) as raised:
        plan_spec(toml.encode(), "x.toml")
    return str(raised.value)


HEAD = '[job]\nname = "t"\n[model]\nid = "org/m"\nrevision = "main"\n'


def test_sharegpt_reads_conversations_and_maps_roles_over_the_defaults() -> None:
    plan = plan_with(data={"format": "sharegpt", "roles": {"bot": "assistant"}})
    assert plan.data.messages_field == "conversations"
    assert plan.data.roles == {
        "bot": "assistant",
        "gpt": "assistant",
        "human": "user",
        "system": "system",
    }
    assert list(plan.data.roles) == sorted(plan.data.roles)  # plan.json sorts keys: same order
    assert plan_with(data={"format": "sharegpt", "roles": {"gpt": "user"}}).data.roles["gpt"] == (
        "user"
    )
    assert input_lines(plan)[2:4] == [
        "  format: sharegpt; fields: messages_field = conversations",
        "  roles (ShareGPT 'from' -> chat role): bot -> assistant, gpt -> assistant, "
        "human -> user, system -> system",
    ]
    chat = plan_with(data={"format": "chat"})
    assert chat.data.messages_field == "messages" and chat.data.roles == {}
    named = plan_with(data={"format": "sharegpt", "messages_field": "turns"})
    assert named.data.messages_field == "turns"


def test_a_role_outside_system_user_assistant_is_refused_at_its_line() -> None:
    message = spec_error(
        HEAD + '[data]\npath = "d.jsonl"\nformat = "sharegpt"\nroles = { bot = "robot" }\n'
    )
    assert 'x.toml:9:11: data.roles.bot: must be one of "system", "user" or "assistant"' in message


def test_a_mixture_with_a_hub_source_needs_the_network() -> None:
    from qlc.runtime.launch import LocalInputs, needs_network

    local = {"id": None, "path": "m", "architecture": "llama"}
    mixed = [{"path": "a.jsonl"}, {"id": "org/b"}]
    plan = plan_with(model=local, data={"path": None, "sources": mixed})
    assert plan.runtime.needs_hub and needs_network(plan, LocalInputs("m", None, None))
    offline = plan_with(model=local, data={"path": None, "sources": [{"path": "a.jsonl"}]})
    assert not offline.runtime.needs_hub
    assert not needs_network(offline, LocalInputs("m", None, None))


def test_mixture_sources_are_planned_with_their_weights_and_local_files() -> None:
    plan = plan_with(
        data={
            "path": None,
            "eval_fraction": 0.1,
            "sources": [
                {"path": "a.jsonl", "weight": 2},
                {"id": "org/b", "revision": "v1", "split": "extra"},
                {"path": "c.parquet", "weight": 0.5},
            ],
        }
    )
    sources = plan.data.sources
    assert [(s.local_path, s.hub_id, s.weight, s.split) for s in sources] == [
        ("a.jsonl", None, 2.0, "train"),
        (None, "org/b", 1.0, "extra"),
        ("c.parquet", None, 0.5, "train"),
    ]
    assert [tuple(f) for f in plan.data.local_files()] == [
        ("data.sources[0].path", "a.jsonl", "jsonl"),
        ("data.sources[2].path", "c.parquet", "parquet"),
    ]
    settings = {row.name: row.value for row in plan.settings()}
    assert settings["data_source_weights"] == [2.0, 1.0, 0.5]  # no user text in train.py
    assert input_lines(plan)[1:4] == [
        "  data: a.jsonl x 2",
        "  data: org/b (extra) x 1",
        "  data: c.parquet x 0.5",
    ]
    assert plan_with().data.local_files()[0].key == "data.path"


@pytest.mark.parametrize(
    ("data", "key", "words"),
    [
        ({"sources": [{"path": "a.jsonl"}]}, "data.path", "set 'sources' or 'path', not both"),
        (
            {"path": None, "split": "x", "sources": [{"path": "a.jsonl"}]},
            "data.split",
            "each source's split",
        ),
        (
            {"path": None, "eval_split": "v", "sources": [{"id": "o/a"}]},
            "data.eval_split",
            "data.eval_fraction",
        ),
        (
            {"path": None, "sources": [{"path": "a.jsonl", "split": "x"}]},
            "data.sources[0].split",
            "a local file is one",
        ),
        (
            {"path": None, "sources": [{"path": "a.txt"}]},
            "data.sources[0].path",
            "unsupported data file",
        ),
        (
            {"path": None, "sources": [{"path": "a.jsonl", "weight": 0}]},
            "data.sources[0].weight",
            "greater than 0",
        ),
        ({"path": None, "sources": [{}]}, "data.sources[0].id", "exactly one of 'id'"),
    ],
)
def test_mixture_mistakes_are_refused_with_the_key_and_the_fix(
    data: dict[str, Any], key: str, words: str
) -> None:
    lines = [
        f"{k} = {v!r}".replace("'", '"')
        for k, v in {"format": "chat", **data}.items()
        if k != "sources" and v is not None
    ]
    body = "\n".join(lines) + "\n"
    if "path" not in data:
        body = 'path = "d.jsonl"\n' + body
    for source in data.get("sources", []):
        body += "[[data.sources]]\n" + "".join(
            f"{k} = {v!r}\n".replace("'", '"') for k, v in source.items()
        )
    message = spec_error(HEAD + "[data]\n" + body)
    assert f": {key}: " in message and words in message, message


def test_keys_the_format_does_not_read_are_warnings_at_their_line() -> None:
    source = HEAD + (
        '[data]\npath = "d.jsonl"\nformat = "text"\nmessages_field = "m"\n'
        'roles = { bot = "assistant" }\n[train]\nsave_steps = 5\n'
    )
    _, warnings = plan_spec(source.encode(), "x.toml")
    shown = [str(w) for w in warnings]
    assert shown == [
        'x.toml:9:1: data.messages_field: does not apply to data.format = "text" (which reads '
        "data.text_field): remove it, or change the format",
        'x.toml:10:1: data.roles: does not apply to data.format = "text" (which reads '
        "data.text_field): remove it, or change the format",
    ]
    chat = HEAD + '[data]\npath = "d.jsonl"\nformat = "chat"\n[train]\nsave_steps = 5\n'
    assert plan_spec(chat.encode(), "x.toml")[1] == []


def test_chat_template_override_is_in_the_plan_and_named_by_its_hash() -> None:
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plan = plan_with(data={"chat_template": template})
    assert plan.data.chat_template == template
    settings = {row.name: row.value for row in plan.settings()}
    assert str(settings["chat_template"]).startswith("data.chat_template (sha256 ")
    assert {r.name: r.value for r in plan_with().settings()}["chat_template"] == "the tokenizer's"
    text = plan_with(data={"format": "text"})
    assert {r.name: r.value for r in text.settings()}["chat_template"] is None


def test_a_chat_template_file_is_a_local_input_of_the_plan() -> None:
    plan = plan_with(data={"chat_template_file": "t/chat.jinja", "format": "sharegpt"})
    assert plan.data.chat_template_file == "t/chat.jinja" and plan.data.chat_template is None
    assert [tuple(f) for f in plan.data.local_inputs()] == [
        ("data.path", "d.jsonl", "jsonl"),
        ("data.chat_template_file", "t/chat.jinja", "jinja"),
    ]
    assert plan.data.local_files() == plan.data.local_inputs()[:1]  # data files only
    settings = {row.name: row.value for row in plan.settings()}
    assert settings["chat_template"] == (
        "data.chat_template_file (its sha256 in the manifest's inputs)"
    )  # no path in train.py
    message = spec_error(
        HEAD + '[data]\npath = "d.jsonl"\nformat = "chat"\n'
        'chat_template = "x"\nchat_template_file = "t.jinja"\n'
    )
    assert "data.chat_template_file: set 'chat_template' (the text) or" in message


def test_alpaca_without_input_and_completion_loss_on_text_refused() -> None:
    plan = plan_with(data={"format": "instruction", "loss": "completion"})
    assert plan.data.input_field is None and plan.data.template == "alpaca"
    message = spec_error(HEAD + '[data]\npath = "d.jsonl"\nformat = "text"\nloss = "completion"\n')
    assert '"sharegpt", or loss = "all"' in message


@pytest.mark.parametrize("architecture", sorted(MODEL_TYPES))
def test_each_architecture_names_its_model_types_and_fast_path(architecture: str) -> None:
    plan = plan_with(
        model={"architecture": architecture, "path": "m", "id": None},
        lora={"target_modules": "all-linear"},
        train={"engine": "fast"},
    )
    assert plan.model.model_types == list(MODEL_TYPES[architecture])
    path = plan.engine.path
    if architecture in FAST_UNMODELLED:
        assert plan.engine.batches == "padded" and path.startswith("generic")
        assert f"model.architecture = '{architecture}': {FAST_UNMODELLED[architecture]}" in path
    else:
        assert plan.engine.batches == "padding-free" and path.startswith("padding-free")
    assert any(path in line for line in settings_lines(plan))  # qlc explain shows it
    assert input_json(plan)["model_types"] == list(MODEL_TYPES[architecture])


def test_gemma3_accepts_the_text_and_the_multimodal_config() -> None:
    assert MODEL_TYPES["gemma3"] == ("gemma3_text", "gemma3")
    assert MODEL_TYPES["llama3"] == ("llama",)


@pytest.mark.parametrize(
    ("architecture", "targets", "words"),
    [
        (
            "phi3",
            ["q_proj", "v_proj"],
            "phi3 has no module 'q_proj' (phi3 fuses them: use qkv_proj",
        ),
        ("phi3", ["gate_proj"], "use gate_up_proj"),
        ("llama", ["qkv_proj"], "llama keeps them separate: use q_proj, k_proj, v_proj"),
        ("gemma2", ["gate_up_proj"], "use gate_proj, up_proj"),
    ],
)
def test_projection_names_the_architecture_lacks_are_refused(
    architecture: str, targets: list[str], words: str
) -> None:
    with pytest.raises(ResolveError) as raised:
        plan_with(model={"architecture": architecture}, lora={"target_modules": targets})
    assert raised.value.key == "lora.target_modules" and words in str(raised.value)


def test_fused_and_all_linear_targets_pass() -> None:
    phi3 = plan_with(
        model={"architecture": "phi3"},
        lora={"target_modules": ["qkv_proj", "o_proj", "gate_up_proj"]},
    )
    assert phi3.lora.target_modules == ["gate_up_proj", "o_proj", "qkv_proj"]
    assert plan_with(model={"architecture": "phi3"}, lora={"target_modules": "all-linear"})
