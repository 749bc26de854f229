"""Round trip: every exported job file of every target, single and multi-node, read back equal.

Hostile text goes into an environment value and into the output location (a relative folder
on a volume, or a bucket path): quotes, backslashes, template and shell syntax, line breaks of
every kind (LF, CR, NEL, U+2028, U+2029), DEL, C0 and C1 controls, U+FFFE, a BOM, non-ASCII
and astral characters. Each spec is refused with a spec error naming the field, or exported;
then every file parses back (YAML with the safe loader, JSON), as one document, and the values
put in come out unchanged: the environment value (Kubernetes: with `$(` written `$$(`, which
Kubernetes turns back into `$(`), QLC_OUTPUT_DIR and the bucket the job mounts.
"""

from __future__ import annotations

import hashlib
import json
import posixpath
from typing import Any

import pytest
import yaml

from qlc.compiler.context import compile_spec
from qlc.compiler.load import SpecError
from qlc.runtime.export import OUTPUT_MOUNT, TARGETS, export

IMAGE = "registry.example.com/qlc/rt@sha256:" + hashlib.sha256(b"round-trip").hexdigest()
RUN_ID = "20261127T000000Z-5eed00"
PAYLOADS = [
    '"', "'", "\\", '\\"', "{{ 7*7 }}", "{% raw %}", "$(touch /tmp/x)", "${HOME}", "`id`",
    "$$(", "a\nb", "a\r\nb", "a\rb", "\t", "\x85", "\u2028", "\u2029", "x\x7fy", "\x1b[31m",
    "\x80\x9f", "\ufffe", "\uffff", "\ufeff", "ключ 名前", "🚀", "# not a comment",
    "key: value", "- item", "--- ", "...", "&anchor *alias", "!!python/object:os.system",
    "yes", "no", "null", "~", "0x1F", "1e3", " leading and trailing ", "%YAML 1.1",
    "\x01\x02\x08\x0b\x0c\x0e\x1f",
]  # fmt: skip
SPEC = """
[job]
name = "round-trip"
output_dir = {output_dir}

[model]
id = "NousResearch/Llama-2-7b-chat-hf"

[data]
id = "mlabonne/guanaco-llama2-1k"
format = "text"

[train]
save_steps = 10

[runtime]
gpus = 1
secrets = ["HF_TOKEN"]

[runtime.env]
NOTE = {note}
"""
TARGET_OPTIONS: dict[str, dict[str, Any]] = {
    "kubernetes": {"volume": "qlc-runs"},
    "aws-batch": {"volume": "fs-0123456789abcdef0", "efs_access_point": "fsap-0123456789abcdef0",
                  "execution_role": "arn:aws:iam::123456789012:role/qlc"},
    "gcp-batch": {"project": "qlc-test-project"},
    "skypilot": {},
}  # fmt: skip
BUCKETS = {"kubernetes": None, "aws-batch": None, "gcp-batch": "gs://b/", "skypilot": "s3://b/"}


def toml_string(text: str) -> str:
    """A TOML basic string holding `text` exactly: printable ASCII as it is, everything else
    as a \\u or \\U escape of its code point."""

    def escaped(char: str) -> str:
        if " " <= char <= "~" and char not in '"\\':
            return char
        code = ord(char)
        return f"\\u{code:04X}" if code <= 0xFFFF else f"\\U{code:08X}"

    return '"' + "".join(escaped(char) for char in text) + '"'


def plan_or_error(note: str, output_dir: str) -> Any:
    source = SPEC.format(note=toml_string(note), output_dir=toml_string(output_dir)).encode()
    try:
        return compile_spec(source, "rt.toml", require_lock=False).plan
    except SpecError as error:
        return error


def read_back(name: str, text: str) -> dict[str, Any]:
    if name.endswith(".json"):
        document: dict[str, Any] = json.loads(text)
        return document
    documents = list(yaml.safe_load_all(text))
    assert len(documents) == 1, f"{name}: {len(documents)} YAML documents"
    assert text.isascii(), f"{name}: not ASCII (the serializer escapes everything else)"
    return documents[0]  # type: ignore[no-any-return]


def environment(target: str, document: dict[str, Any]) -> dict[str, str]:
    if target == "kubernetes":
        spec = document["spec"]
        if document["kind"] == "JobSet":
            spec = spec["replicatedJobs"][0]["template"]["spec"]
        items = spec["template"]["spec"]["containers"][0]["env"]
        return {item["name"]: item.get("value") for item in items}
    if target == "aws-batch":
        properties = (
            document.get("containerProperties")
            or document["nodeProperties"]["nodeRangeProperties"][0]["container"]
        )
        return {item["name"]: item["value"] for item in properties["environment"]}
    if target == "gcp-batch":
        variables: dict[str, str] = document["taskGroups"][0]["taskSpec"]["environment"][
            "variables"
        ]
        return variables
    envs: dict[str, str] = document["envs"]
    return envs


def mounted_bucket(target: str, document: dict[str, Any]) -> str | None:
    if target == "gcp-batch":
        return "gs://" + document["taskGroups"][0]["taskSpec"]["volumes"][0]["gcs"]["remotePath"]
    if target == "skypilot":
        source: str = document["file_mounts"][OUTPUT_MOUNT]["source"]
        return source
    return None


def as_written(target: str, value: str) -> str:
    """An environment value as the job file must hold it: Kubernetes expands $(NAME) in env
    values, and passes $$( on as a literal $(."""
    return value.replace("$(", "$$(") if target == "kubernetes" else value


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("nodes", [1, 2])
def test_every_exported_file_reads_back_the_values_put_in(target: str, nodes: int, tally) -> None:  # type: ignore[no-untyped-def]
    exported = refused = 0
    for payload in PAYLOADS:
        bucket = BUCKETS[target]
        output_dir = f"{bucket}runs{payload}" if bucket else f"runs{payload}"
        plan = plan_or_error(payload, output_dir)
        tally()
        if isinstance(plan, SpecError):
            assert "rt.toml:" in str(plan) and ("runtime.env" in str(plan) or "job.output_dir"
                                                in str(plan)), str(plan)  # fmt: skip
            refused += 1
            continue
        options = {"retries": 0} if target == "gcp-batch" and nodes > 1 else {}
        result = export(plan, IMAGE, target, run_id=RUN_ID, nodes=nodes,
                        **TARGET_OPTIONS[target], **options)  # fmt: skip
        below = [] if bucket else [posixpath.normpath(output_dir)]
        run_dir = "/".join([OUTPUT_MOUNT, *below, "round-trip", RUN_ID])
        assert result.run_dir == run_dir, payload
        for name, text in result.files.items():
            document = read_back(name, text)
            if name == "submit-job.json":
                continue
            env = environment(target, document)
            assert env["NOTE"] == as_written(target, payload), (name, payload)
            assert env["QLC_OUTPUT_DIR"] == as_written(target, run_dir), (name, payload)
            assert mounted_bucket(target, document) in (None, output_dir.rstrip("/")), payload
        exported += 1
    assert exported > len(PAYLOADS) // 2, f"only {exported} payloads exported ({refused} refused)"
