"""Helpers for the runtime tests: a fake engine and a copy of the tiny project."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from suite_support import REPO, copy_tiny_project  # noqa: F401  (the runtime tests' import)

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.compiler.render import plan_json
from qlc.runtime.build import PLAN_LABEL
from qlc.runtime.docker_engine import (
    BuildError,
    ContainerRequest,
    ContainerState,
    ImageInfo,
    PullError,
)
from qlc.runtime.run import RunInputs, run_inputs

BASE_IMAGE = os.environ.get("QLC_BASE_IMAGE", "qlc-base:bookworm")


@dataclass
class FakeEngine:
    """Stands in for the daemon: records every call, replays a scripted container."""

    endpoint: str = "fake://daemon"
    images: dict[str, ImageInfo] = field(default_factory=dict)
    build_lines: list[str] = field(default_factory=lambda: ["Step 1/1 : FROM base"])
    build_error: BuildError | None = None
    log_lines: list[str] = field(default_factory=list)
    exit_code: int = 0
    oom_killed: bool = False
    start_error: Exception | None = None
    on_start: Callable[[ContainerRequest], None] | None = None
    interrupt_after: int | None = None  # raise KeyboardInterrupt after this many log lines
    registry: dict[str, ImageInfo] = field(default_factory=dict)  # REPO@sha256:... -> image
    pull_error: PullError | None = None
    calls: list[str] = field(default_factory=list)
    created: list[ContainerRequest] = field(default_factory=list)
    builds: list[dict[str, object]] = field(default_factory=list)

    def ping(self) -> None:
        self.calls.append("ping")

    def find_image(self, ref: str) -> ImageInfo | None:
        self.calls.append(f"find_image {ref}")
        return self.images.get(ref)

    def pull(self, reference: str) -> ImageInfo:
        self.calls.append(f"pull {reference}")
        if self.pull_error is not None:
            raise self.pull_error
        image = self.registry.get(reference)
        if image is None:
            raise PullError(f"cannot pull {reference}: manifest unknown")
        image = replace(image, repo_digests=(*image.repo_digests, reference))
        self.images[reference] = self.images[image.id] = image
        return image

    def tag(self, image: str, repository: str, tag: str) -> None:
        self.calls.append(f"tag {image} {repository}:{tag}")
        found = self.images[image]
        self.images[f"{repository}:{tag}"] = replace(
            found, tags=(*found.tags, f"{repository}:{tag}")
        )

    def build(
        self,
        files: Mapping[str, bytes],
        tag: str,
        buildargs: Mapping[str, str],
        labels: Mapping[str, str],
        on_line: Callable[[str], None],
    ) -> str:
        self.calls.append(f"build {tag}")
        self.builds.append(
            {
                "tag": tag,
                "buildargs": dict(buildargs),
                "labels": dict(labels),
                "files": sorted(files),
                "contents": dict(files),
            }
        )
        for line in self.build_lines:
            on_line(line)
        if self.build_error is not None:
            raise self.build_error
        image_id = "sha256:" + f"{len(self.builds):064x}"
        info = ImageInfo(
            id=image_id, tags=(tag,), labels=dict(labels), repo_digests=(), user="10001:10001"
        )
        self.images[tag] = self.images[image_id] = info
        return image_id

    def create(self, request: ContainerRequest) -> str:
        self.calls.append("create")
        self.created.append(request)
        return "c0ffee"

    def start(self, container_id: str) -> None:
        self.calls.append("start")
        if self.start_error is not None:
            raise self.start_error
        if self.on_start is not None:
            self.on_start(self.created[-1])

    def logs(self, container_id: str) -> Iterator[str]:
        for number, line in enumerate(self.log_lines):
            if self.interrupt_after is not None and number == self.interrupt_after:
                self.interrupt_after = None
                raise KeyboardInterrupt
            yield line

    def wait(self, container_id: str) -> int:
        self.calls.append("wait")
        return self.exit_code

    def stop(self, container_id: str, timeout_s: int) -> None:
        self.calls.append("stop")

    def kill(self, container_id: str, signal: str = "SIGKILL") -> None:
        self.calls.append("kill" if signal == "SIGKILL" else f"kill {signal}")

    def state(self, container_id: str) -> ContainerState:
        return ContainerState("exited", self.exit_code, self.oom_killed, "", None, None)

    def remove(self, container_id: str) -> None:
        self.calls.append("remove")

    def create_network(self, name: str, labels: Mapping[str, str]) -> str:
        self.calls.append(f"create_network {name}")
        return f"net-{name}"

    def remove_network(self, network_id: str) -> None:
        self.calls.append(f"remove_network {network_id}")


def tiny_plan(spec: Path) -> Plan:
    """The plan a spec compiles to (no lock needed)."""
    from qlc.compiler.context import plan_spec

    plan, _ = plan_spec(spec.read_bytes(), spec.name)
    return plan


def tiny_inputs(spec: Path) -> RunInputs:
    """What `qlc run` launches for a spec: its built plan, inputs found beside the spec."""
    return run_inputs(tiny_plan(spec), spec, spec.parents[1])


def plan_labels(spec: Path) -> dict[str, str]:
    """An image's labels as build writes them: the plan that every run of it reads."""
    return {PLAN_LABEL: plan_json(tiny_plan(spec)).decode()}


def trainer_manifest(
    status: str, subjects: list[dict[str, object]], metrics: dict[str, object] | None = None
) -> dict[str, object]:
    """A manifest as the trainer writes it (schema v2), for scripted containers."""
    run = dict.fromkeys(contract.RUN_SCHEMA)
    run.update(seed=42, deterministic=True, smoke=False, engine="reference", world_size=1,
               started_at="2026-01-01T00:00:00Z")  # fmt: skip
    return {
        "_type": contract.STATEMENT_TYPE,
        "subject": subjects,
        "predicateType": contract.PREDICATE_TYPE,
        "predicate": {
            "version": contract.MANIFEST_VERSION,
            "status": status,
            "qlc_version": "0",
            "spec": {"name": "specs/tiny.toml", "sha256": "s" * 64},
            "plan_sha256": None,
            "lock_sha256": None,
            "image": {"id": None, "digest": None, "base": None},
            "inputs": {"model": {}, "data": {}},
            "run": run,
            "effective": {},
            "substitutions": [],
            "decisions": [],
            "observed": {},
            "environment": {"user": {"uid": 10001, "gid": 10001}},
            "metrics": metrics or {},
            "records": {},
            "tracking": [],
            "error": None,
        },
    }
