"""What the trainer's tests share: the tiny assets, plans compiled from real specs, and the
compiled train.py run as `python train.py` (from specs/, where the specs' relative paths start)."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc import __version__, contract
from qlc.compiler.context import compile_spec
from qlc.compiler.plan import Plan
from qlc.compiler.resolve import resolve
from qlc.compiler.spec import Spec

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
TINY_MODEL = SPECS / "tiny" / "model"
TINY_DATA = SPECS / "tiny" / "data.jsonl"
ADAPTER = Path(contract.ADAPTER_DIR) / "adapter_model.safetensors"


def edited_spec(spec_name: str, edits: dict[str, str]) -> bytes:
    """specs/<spec_name> with each {old: new} text edit made (each `old` must be there)."""
    text = (SPECS / spec_name).read_text(encoding="utf-8")
    for old, new in edits.items():
        assert old in text, f"{old!r} is not in specs/{spec_name}"
        text = text.replace(old, new)
    return text.encode()


def compile_to(spec_name: str, dest: Path, source: bytes | None = None) -> Path:
    """Compile specs/<spec_name> (or `source` under that name) and write its context to dest."""
    path = SPECS / spec_name
    lock = path.with_suffix(".lock")
    context = compile_spec(
        path.read_bytes() if source is None else source,
        f"specs/{spec_name}",
        lock.read_bytes() if lock.is_file() and source is None else None,
        require_lock=False,
    )
    for name, data in context.files.items():
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        (dest / name).write_bytes(data)
    return dest


def plan_of(spec_name: str, source: bytes | None = None) -> Plan:
    """The plan of specs/<spec_name> (or `source` under that name), as compiled."""
    path = SPECS / spec_name
    return compile_spec(
        path.read_bytes() if source is None else source, f"specs/{spec_name}", require_lock=False
    ).plan


def plan_from(values: dict[str, Any], name: str = "specs/test.toml") -> Plan:
    """The plan of a spec given as a dict (no rendering: any engine)."""
    text = json.dumps(values, sort_keys=True).encode()
    return resolve(
        Spec.model_validate(values),
        spec_name=name,
        spec_sha256=hashlib.sha256(text).hexdigest(),
        qlc_version=__version__,
        lock=None,
    )


def train_env(out: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(contract.PROTOCOL_PREFIX)}
    env.update(PYTHONUNBUFFERED="1", TOKENIZERS_PARALLELISM="false")
    env[contract.ENV_OUTPUT_DIR] = str(out)
    env.update(extra)
    return env


def run_train(
    context: Path, out: Path, timeout: int = 600, **extra: str
) -> subprocess.CompletedProcess[str]:
    """`python train.py` of a compiled context, run from specs/."""
    return subprocess.run(
        [sys.executable, str(context / contract.SCRIPT_FILE)],
        cwd=SPECS,
        env=train_env(out, **extra),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_train(context: Path, out: Path, **extra: str) -> subprocess.Popen[str]:
    """train.py started in the background, stdout and stderr merged, one line at a time."""
    return subprocess.Popen(
        [sys.executable, str(context / contract.SCRIPT_FILE)],
        cwd=SPECS,
        env=train_env(out, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
    )


def stop_after_step(process: subprocess.Popen[str], step: int, timeout: int = 600) -> str:
    """Send SIGTERM once the progress line of `step` is out; the whole output once it ended."""
    assert process.stdout is not None
    seen: list[str] = []
    deadline = time.time() + timeout
    for line in process.stdout:
        seen.append(line)
        record = progress(line)
        if record and record[0]["step"] >= step:
            process.send_signal(signal.SIGTERM)
            break
        assert time.time() < deadline, "".join(seen[-50:])
    rest, _ = process.communicate(timeout=timeout)
    return "".join(seen) + rest


@dataclass(frozen=True)
class Stopped:
    """A run stopped by SIGTERM, then run again in the same directory until it finished."""

    out: Path
    code: int  # the stopped run's exit status
    output: str  # its stdout and stderr
    manifest: dict[str, Any]  # its manifest
    metrics: list[dict[str, Any]]  # its metrics.jsonl
    checkpoints: dict[str, list[str]]  # checkpoint -> its files, when it stopped
    resumed: str  # the resumed run's stdout

    @property
    def step(self) -> int:
        """The last step the stopped run trained (its checkpoint's)."""
        return int(progress(self.output)[-1]["step"])


def stop_and_resume(context: Path, out: Path, step: int, **extra: str) -> Stopped:
    """train.py stopped by SIGTERM once `step` is logged, then rerun to the end."""
    process = start_train(context, out, **extra)
    output = stop_after_step(process, step)
    checkpoints = {
        folder.name: sorted(p.name for p in folder.iterdir())
        for folder in (out / contract.CHECKPOINTS_DIR).glob("checkpoint-*")
    }
    stopped = manifest(out), metrics(out)
    resumed = run_train(context, out, **extra)
    assert_ok(resumed)
    return Stopped(out, process.returncode, output, *stopped, checkpoints, resumed.stdout)


def assert_ok(result: subprocess.CompletedProcess[str]) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + "\n" + result.stderr[-6000:]


def sha256(path: Path) -> str:
    return contract.sha256_file(path)


def progress(stdout: str) -> list[dict[str, Any]]:
    prefix = contract.PROGRESS_PREFIX
    return [
        json.loads(line[len(prefix) :]) for line in stdout.splitlines() if line.startswith(prefix)
    ]


def manifest(out: Path) -> dict[str, Any]:
    """The run's manifest, read back through the contract's schema check."""
    return contract.read_manifest_file(out / contract.MANIFEST_FILE)


def metrics(out: Path) -> list[dict[str, Any]]:
    lines = (out / contract.METRICS_FILE).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines]
