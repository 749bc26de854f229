"""A mixture of local sources and a chat-template file through the one launch path: each found
beside the spec, mounted read-only in a container and named to the trainer (QLC_INPUT_PATHS),
refused by export; and a real `qlc run --local` of it: the manifest records each source's hash
and weight and the template's hash, the adapter's tokenizer keeps the template, reproduce
compares them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtime_fakes import tiny_plan
from tiny_runs import call_cli

from qlc import contract
from qlc.runtime.export import ExportError, check_inputs
from qlc.runtime.launch import host_input_paths
from qlc.runtime.records import BuildRecord
from qlc.runtime.reproduce import input_verdicts
from qlc.runtime.run import RunInputError, container_request, run_inputs
from qlc.trainer.runenv import RunEnv

REPO = Path(__file__).resolve().parents[2]
CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + "
    "'<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SPEC = """[job]
name = "mix"
seed = 9
deterministic = true

[model]
path = "tiny/model"

[data]
format = "chat"
loss = "completion"
max_length = 96
chat_template_file = "templates/chatml.jinja"

[[data.sources]]
path = "chat/data.jsonl"
weight = 2

[[data.sources]]
path = "more/data.jsonl"
weight = 0.5

[quantization]
compute_dtype = "float32"

[lora]
r = 4
alpha = 8
target_modules = ["q_proj", "v_proj"]

[train]
max_steps = 3
batch_size = 4
learning_rate = 1e-2
optimizer = "adamw_torch"
logging_steps = 1
save_steps = 10

[runtime]
gpus = 0
"""


@pytest.fixture
def mixture(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "specs" / "tiny" / "model", tmp_path / "tiny" / "model")
    shutil.copytree(REPO / "specs" / "chat", tmp_path / "chat")
    (tmp_path / "more").mkdir()
    rows = [{"messages": [{"role": "user", "content": f"Count to {i}."},
                          {"role": "assistant", "content": " ".join(map(str, range(1, i + 2)))}]}
            for i in range(8)]  # fmt: skip
    (tmp_path / "more" / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "templates").mkdir()
    (tmp_path / "templates" / "chatml.jinja").write_text(CHATML)
    spec = tmp_path / "mix.toml"
    spec.write_text(SPEC)
    return spec


def record(spec: Path) -> BuildRecord:
    return BuildRecord(
        job="mix",
        tag="qlc/mix:0123456789ab",
        image_id="sha256:" + "e" * 64,
        image_key="0" * 64,
        context_hash="sha256:" + "c" * 64,
        context_dir="/ctx",
        spec_path=str(spec),
        spec_sha256="s" * 64,
        lock_sha256=None,
        base_image="qlc-base:bookworm",
        base_image_overridden=True,
        base_image_id=None,
        base_image_digests=[],
        qlc_version="0",
        built_at="2026-01-01T00:00:00+00:00",
        build_seconds=1.0,
        cache_hit=False,
        log_path=None,
    )


def test_each_source_is_mounted_read_only_and_named_to_the_trainer(mixture: Path) -> None:
    inputs = run_inputs(tiny_plan(mixture), mixture, mixture.parent)
    assert set(inputs.local.files) == {"data.sources[0].path", "data.sources[1].path",
                                       "data.chat_template_file"}  # fmt: skip
    request = container_request(record(mixture), inputs, mixture.parent / "run", "1000:1000",
                                smoke=False, environ={})  # fmt: skip
    mounts = {m.target: m for m in request.mounts}
    named = json.loads(request.environment[contract.ENV_INPUT_PATHS])
    assert named == {"data.chat_template_file": "/inputs/files/0/chatml.jinja",
                     "data.sources[0].path": "/inputs/files/1/data.jsonl",
                     "data.sources[1].path": "/inputs/files/2/data.jsonl"}  # fmt: skip
    for key, target in named.items():
        assert mounts[target].read_only and Path(mounts[target].source) == inputs.local.files[key]
    assert contract.ENV_DATA_PATH not in request.environment
    env = RunEnv.read({contract.ENV_INPUT_PATHS: request.environment[contract.ENV_INPUT_PATHS]})
    assert env.input_paths == named
    assert host_input_paths(inputs.local)["data.sources[1].path"] == str(
        (mixture.parent / "more" / "data.jsonl").resolve())  # fmt: skip


def test_a_missing_source_is_named_and_export_refuses_local_sources(mixture: Path) -> None:
    plan = tiny_plan(mixture)
    with pytest.raises(
        ExportError, match=r"data\.sources\[0\]\.path = 'chat/data\.jsonl'"
    ) as refused:
        check_inputs(plan)
    assert "data.chat_template_file = 'templates/chatml.jinja'" in str(refused.value)
    (mixture.parent / "templates" / "chatml.jinja").unlink()
    with pytest.raises(RunInputError, match=r"data\.chat_template_file = 'templates/chatml"):
        run_inputs(plan, mixture, mixture.parent)
    (mixture.parent / "more" / "data.jsonl").unlink()
    with pytest.raises(RunInputError, match=r"data\.sources\[1\]\.path = 'more/data\.jsonl': no"):
        run_inputs(plan, mixture, mixture.parent)


@pytest.mark.slow
def test_a_mixture_trains_and_its_sources_are_recorded_and_compared(
    mixture: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(mixture.parent)
    code, _, err = call_cli(["run", "mix.toml", "--local"], capsys)
    assert code == 0, err[-3000:]
    (run,) = (mixture.parent / "runs" / "mix").iterdir()
    predicate = json.loads((run / "manifest.json").read_text())["predicate"]
    assert predicate["status"] == "succeeded"
    data = predicate["inputs"]["data"]
    chat, more = (mixture.parent / "chat" / "data.jsonl"), (mixture.parent / "more" / "data.jsonl")
    assert data["files"] == {"sources/0/data.jsonl": contract.sha256_file(chat),
                             "sources/1/data.jsonl": contract.sha256_file(more)}  # fmt: skip
    assert [(s["weight"], s["rows"], s["train_rows"]) for s in data["sources"]] == [
        (2.0, 16, 32), (0.5, 8, 4)]  # fmt: skip
    report = json.loads((run / "data_report.json").read_text())["train"]
    assert report["rows"] == 36
    saved = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    template = saved.get("chat_template") or (run / "adapter" / "chat_template.jinja").read_text()
    assert template == CHATML
    jinja = mixture.parent / "templates" / "chatml.jinja"
    assert predicate["inputs"]["chat_template"]["files"] == {
        "chatml.jinja": contract.sha256_file(jinja)}  # fmt: skip
    assert predicate["effective"]["chat_template"].startswith("data.chat_template_file")
    inputs = run_inputs(tiny_plan(mixture), mixture, mixture.parent)
    verdicts = {v.item: v for v in input_verdicts(predicate, inputs)}
    assert verdicts["data sources hash"].ok, verdicts["data sources hash"].detail
    more.write_text(more.read_text() + json.dumps({"messages": []}) + "\n")
    changed = {v.item: v for v in input_verdicts(predicate, inputs)}["data sources hash"]
    assert not changed.ok and "sources/1/data.jsonl: sha256" in changed.detail
    assert verdicts["chat template hash"].ok
    jinja.write_text(CHATML + " ")
    template_now = {v.item: v for v in input_verdicts(predicate, inputs)}["chat template hash"]
    assert not template_now.ok and "chatml.jinja: sha256" in template_now.detail
