"""The one launch path: the trainer's command and environment, from a built plan.

`qlc run` (a container), `qlc run --local` (this Python), `qlc reproduce` and every `qlc export`
target start the trainer with what `trainer_env` returns for their place: where the run
directory is, where local inputs are, which image ran, the run's id. Nothing here reads a spec
file: the plan is the one built (from the build context, or the image's label).
"""

from __future__ import annotations

import json
import os
import secrets as random_tokens
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.userio import is_dir, is_file

OBJECT_STORE_SCHEMES = contract.OBJECT_STORE_SCHEMES
CONTAINER_MODEL_DIR = f"{contract.CONTAINER_INPUTS_DIR}/model"
CONTAINER_DATA_DIR = f"{contract.CONTAINER_INPUTS_DIR}/data"
CONTAINER_FILES_DIR = f"{contract.CONTAINER_INPUTS_DIR}/files"


class LaunchError(Exception):
    """A run that cannot be launched as asked (a user error)."""


@dataclass(frozen=True)
class LocalInputs:
    """A plan's local inputs found on this host (relative paths start at the spec's folder)."""

    model_dir: Path | None
    data_file: Path | None
    tokenizer_dir: Path | None
    files: dict[str, Path] = field(default_factory=dict)  # the others: {spec key: file}

    @property
    def paths(self) -> list[Path]:
        """Every local input found (what a container mounts)."""
        found = [self.model_dir, self.data_file, *self.files.values()]
        return [path for path in found if path is not None]


@dataclass(frozen=True)
class ImageRef:
    id: str | None
    digest: str | None
    base: str | None


def new_run_id() -> str:
    """A run's id: UTC time and random hex, sortable and unique."""
    return f"{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}-{random_tokens.token_hex(3)}"


def local_inputs(plan: Plan, spec_dir: Path, where: str) -> LocalInputs:
    """Find the plan's local model, tokenizer and data; LaunchError names what is missing."""
    model_dir = data_file = tokenizer_dir = None
    if plan.model.local_path is not None:
        model_dir = _local(spec_dir, plan.model.local_path, "model.path", where, want_dir=True)
    if plan.data.local_path is not None:
        data_file = _local(spec_dir, plan.data.local_path, "data.path", where, want_dir=False)
    if plan.model.tokenizer is not None and (spec_dir / plan.model.tokenizer).is_dir():
        tokenizer_dir = (spec_dir / plan.model.tokenizer).resolve()
    files = {file.key: _local(spec_dir, file.path, file.key, where, want_dir=False)
             for file in plan.data.local_inputs() if file.key != "data.path"}  # fmt: skip
    return LocalInputs(model_dir, data_file, tokenizer_dir, files)


def _local(base: Path, value: str, key: str, where: str, want_dir: bool) -> Path:
    path = (base / value).resolve()
    if not (is_dir(path) if want_dir else is_file(path)):
        kind = "directory" if want_dir else "file"
        raise LaunchError(f"{where}: {key} = {value!r}: no such {kind} ({path})")
    return path


def needs_network(plan: Plan, inputs: LocalInputs) -> bool:
    """A container needs a network only to reach the hub (a model, tokenizer or dataset id,
    a mixture's hub source), an object store (a model or data URI, downloaded at start) or a
    tracker's server (W&B online, MLflow)."""
    tokenizer_from_hub = plan.model.tokenizer is not None and inputs.tokenizer_dir is None
    data_from_hub = plan.data.hub_id is not None or any(
        source.hub_id is not None for source in plan.data.sources
    )
    from_hub = plan.model.hub_id is not None or data_from_hub or tokenizer_from_hub
    return from_hub or bool(plan.object_stores) or plan.track.needs_network


def trainer_env(
    plan: Plan,
    *,
    output_dir: str,
    model_path: str | None = None,
    data_path: str | None = None,
    input_paths: Mapping[str, str] | None = None,
    smoke: bool = False,
    image: ImageRef | None = None,
    run_id: str | None = None,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """The trainer's environment for one launch: the spec's plain variables, then the protocol
    (which a spec can never set: the spec refuses QLC_* and loader variables), then what the
    person running qlc added explicitly (`qlc run --env`). Secrets are added by the caller at
    run time only, never stored."""
    env = dict(plan.runtime.env)
    env[contract.ENV_OUTPUT_DIR] = output_dir
    if model_path is not None:
        env[contract.ENV_MODEL_PATH] = model_path
    if data_path is not None:
        env[contract.ENV_DATA_PATH] = data_path
    if input_paths:
        env[contract.ENV_INPUT_PATHS] = json.dumps(dict(input_paths), sort_keys=True)
    if smoke:
        env[contract.ENV_SMOKE] = "1"
    if run_id is not None:
        env[contract.ENV_RUN_ID] = run_id
    if image is not None:
        for name, value in ((contract.ENV_IMAGE_ID, image.id),
                            (contract.ENV_IMAGE_DIGEST, image.digest),
                            (contract.ENV_BASE_IMAGE, image.base)):  # fmt: skip
            if value:
                env[name] = value
    if plan.job.deterministic:  # peft writes target_modules from a set: fix string hashing
        env["PYTHONHASHSEED"] = "0"
    env.update(extra or {})
    return env


def container_paths(inputs: LocalInputs) -> tuple[str | None, str | None]:
    """Where a container sees the local model and data (mounted read-only)."""
    model = CONTAINER_MODEL_DIR if inputs.model_dir is not None else None
    data = f"{CONTAINER_DATA_DIR}/{inputs.data_file.name}" if inputs.data_file is not None else None
    return model, data


def container_input_paths(inputs: LocalInputs) -> dict[str, str]:
    """Where a container sees the other local inputs: one folder each (names may clash)."""
    return {key: f"{CONTAINER_FILES_DIR}/{index}/{path.name}"
            for index, (key, path) in enumerate(sorted(inputs.files.items()))}  # fmt: skip


def host_input_paths(inputs: LocalInputs) -> dict[str, str]:
    """The other local inputs where this host's Python finds them (run --local)."""
    return {key: str(path) for key, path in inputs.files.items()}


def container_user(image_user: str) -> str:
    """Run as this host user when not root (files in the run directory stay theirs), else the
    image's numeric non-root user."""
    if os.getuid() != 0:
        return f"{os.getuid()}:{os.getgid()}"
    parts = image_user.split(":")
    if parts[0].isdigit() and parts[0] != "0":
        return image_user if len(parts) == 2 else f"{parts[0]}:{parts[0]}"
    return contract.CONTAINER_USER


def parse_env_options(pairs: list[str]) -> dict[str, str]:
    """`--env NAME=VALUE` options of the person running qlc: they may set anything a spec may
    not (PYTHONPATH, HF_ENDPOINT...), except qlc's own protocol variables."""
    found: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name or "\x00" in pair:
            raise LaunchError(f"--env {pair[:80]!r}: write NAME=VALUE")
        if name.startswith(contract.PROTOCOL_PREFIX):
            raise LaunchError(f"--env {name}: QLC_* variables are set by qlc itself")
        found[name] = value
    return found
