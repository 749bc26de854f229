"""resolve: Spec -> Plan, driven by the compatibility table."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any

import pytest

from qlc.compiler.compat import load_table
from qlc.compiler.plan import LockRef, Plan
from qlc.compiler.resolve import ResolveError, resolve
from qlc.compiler.spec import Spec

SPECS = Path(__file__).resolve().parents[2] / "specs"
BASE: dict[str, Any] = {
    "job": {"name": "t"},
    "model": {"id": "org/model"},
    "data": {"id": "org/data", "format": "text"},
}


def spec_with(**runtime: Any) -> Spec:
    return Spec.model_validate({**BASE, "runtime": runtime})


def plan_of(spec: Spec, lock: LockRef | None = None) -> Plan:
    return resolve(spec, spec_name="x.toml", spec_sha256="0" * 64, qlc_version="0.1.0", lock=lock)


def test_gpu_plan_pins_cuda_image_matching_torch_wheel() -> None:
    plan = plan_of(spec_with(gpus=1))
    table = load_table()
    build = table.torch_build(plan.stack.torch)
    assert build is not None
    assert plan.stack.torch == table.default_torch == "2.13.0"
    assert plan.stack.cuda == build.cuda == "13.0"
    assert plan.base_image.repository == "nvidia/cuda"
    assert plan.base_image.tag.startswith("13.0.") and "ubuntu24.04" in plan.base_image.tag
    assert plan.base_image.python == plan.stack.python == "3.12"
    assert plan.base_image.digest.startswith("sha256:") and not plan.base_image.verified
    assert plan.gpu_archs == list(build.archs)
    assert plan.min_driver == "580.65.06"
    assert plan.stack.requirements() == [
        "accelerate==1.15.0", "bitsandbytes==0.50.2", "datasets==5.2.0", "peft==0.21.2",
        "torch==2.13.0", "transformers==5.24.0", "trl==1.16.0",
    ]  # fmt: skip


def test_cpu_plan_uses_python_311_bookworm_and_no_gpu_facts() -> None:
    plan = plan_of(spec_with(gpus=0))
    assert plan.base_image.repository == "python"
    assert "bookworm" in plan.base_image.tag
    assert plan.stack.python == plan.base_image.python == "3.11"
    assert plan.gpu_archs == [] and plan.min_driver == ""


def test_plan_carries_inputs_and_lock() -> None:
    lock = LockRef(path="x.lock", sha256="a" * 64, input_hash="sha256:" + "b" * 64)
    spec = spec_with(gpus=2)
    plan = plan_of(spec, lock)
    assert plan.lock == lock and plan.spec_name == "x.toml" and plan.qlc_version == "0.1.0"
    assert plan.runtime.gpus == 2 and plan.schedule.world_size == 2
    assert plan.model.hub_id == "org/model" and plan.data.hub_id == "org/data"


def test_resolve_is_deterministic() -> None:
    spec = spec_with(gpus=1, gpu_archs=["9.0", "8.0", "9.0"])
    first = plan_of(spec).model_dump_json()
    assert first == plan_of(spec).model_dump_json()
    assert plan_of(spec).gpu_archs == ["8.0", "9.0"]


@pytest.mark.parametrize("torch", ["2.13", "2.13.0"])
def test_torch_prefix_and_exact_select_the_row(torch: str) -> None:
    assert plan_of(spec_with(torch=torch, cuda="13.0", python="3.12")).stack.torch == "2.13.0"


def test_arch_forward_compatible_within_major_is_accepted() -> None:
    # sm_86 kernels run on 8.9 (L4, RTX 4090); sm_120 on 12.1.
    assert plan_of(spec_with(gpu_archs=["8.9", "12.1"])).gpu_archs == ["8.9", "12.1"]


@pytest.mark.parametrize(
    ("runtime", "key", "fragment"),
    [
        ({"torch": "2.5"}, "runtime.torch", 'nearest supported: "2.13.0"'),
        ({"torch": "2.13.7"}, "runtime.torch", 'nearest supported: "2.13.0"'),
        ({"cuda": "12.8"}, "runtime.cuda", 'nearest supported: "13.0"'),
        ({"python": "3.11"}, "runtime.python", 'nearest supported: "3.12"'),
        ({"gpus": 0, "python": "3.12"}, "runtime.python", 'nearest supported: "3.11"'),
        ({"gpu_archs": ["7.0"]}, "runtime.gpu_archs", 'nearest supported: "7.5"'),
        ({"gpu_archs": ["8.0", "11.0"]}, "runtime.gpu_archs", "compute capability 11.0"),
        ({"gpus": 0, "cuda": "13.0"}, "runtime.cuda", "set runtime.gpus to 1 or more"),
        ({"gpus": 0, "gpu_archs": ["8.0"]}, "runtime.gpu_archs", "needs a GPU"),
    ],
)
def test_unsupported_combinations_name_key_and_nearest_choice(
    runtime: dict[str, Any], key: str, fragment: str
) -> None:
    with pytest.raises(ResolveError) as caught:
        plan_of(spec_with(**runtime))
    assert caught.value.key == key
    assert fragment in str(caught.value)


@pytest.mark.parametrize("path", sorted(SPECS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_spec_resolves(path: Path) -> None:
    spec = Spec.model_validate(tomllib.loads(path.read_text(encoding="utf-8")), strict=False)
    plan = plan_of(spec)
    assert plan.stack.python == plan.base_image.python
    assert (plan.gpu_archs == []) == (spec.runtime.gpus == 0)
