"""The compatibility table, row by row: every row must be consistent with the others."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path
from types import ModuleType

import pytest
from pydantic import ValidationError

from qlc.compiler.compat import (
    BitsandbytesBuild,
    CompatTable,
    ImageRow,
    StackRow,
    TorchBuild,
    load_table,
    parse_table,
)

ROOT = Path(__file__).resolve().parents[2]
TABLE = load_table()
REPO_AT_COMMIT = re.compile(r"^[\w.-]+/[\w.-]+ \S+ @[0-9a-f]{40}$")


def regen() -> ModuleType:
    spec = importlib.util.spec_from_file_location("regen_compat", ROOT / "tools/regen_compat.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def test_table_is_what_the_regeneration_script_writes() -> None:
    text = (ROOT / "compiler/data/compat.toml").read_text(encoding="utf-8")
    assert regen().render_table() == text, "stale: run python tools/regen_compat.py"


def test_default_torch_has_a_row_and_a_stack() -> None:
    assert TABLE.torch_build(TABLE.default_torch) is not None
    assert TABLE.stack_for(TABLE.default_torch) is not None


@pytest.mark.parametrize("row", TABLE.torch, ids=lambda r: f"torch-{r.version}")
def test_torch_row(row: TorchBuild) -> None:
    # The wheel's CUDA has a base image of the same CUDA, a driver floor and a stack.
    image = TABLE.cuda_image(row.cuda)
    assert image is not None, f"no base image for CUDA {row.cuda}"
    assert image.cuda == row.cuda
    assert TABLE.driver_for(row.cuda) is not None
    assert TABLE.stack_for(row.version) is not None
    assert list(row.archs) == sorted(set(row.archs), key=numbers)
    assert (
        f"cuda = '{row.cuda}'" in row.evidence or f"cu{row.cuda.replace('.', '')}" in row.evidence
    )
    lowest_python = re.fullmatch(r">=(\d+\.\d+)", row.requires_python)
    assert lowest_python is not None
    for python in {i.python for i in TABLE.image}:
        assert numbers(python) >= numbers(lowest_python.group(1))


@pytest.mark.parametrize("row", TABLE.stack, ids=lambda r: f"stack-torch-{r.torch}")
def test_stack_row(row: StackRow) -> None:
    torch = TABLE.torch_build(row.torch)
    bnb = TABLE.bitsandbytes_build(row.bitsandbytes)
    assert torch is not None and bnb is not None
    assert torch.cuda in bnb.cuda_builds, "bitsandbytes has no build for torch's CUDA"
    for name in ("transformers", "peft", "trl", "bitsandbytes", "accelerate", "datasets"):
        assert re.fullmatch(r"\d+\.\d+\.\d+", getattr(row, name)), name


@pytest.mark.parametrize("row", TABLE.bitsandbytes, ids=lambda r: f"bnb-{r.version}")
def test_bitsandbytes_row(row: BitsandbytesBuild) -> None:
    assert list(row.cuda_builds) == sorted(set(row.cuda_builds), key=numbers)
    for cuda in row.cuda_builds:
        assert f"{cuda.replace('.', '')}" in row.evidence


@pytest.mark.parametrize("row", TABLE.driver, ids=lambda r: f"cuda-{r.cuda}")
def test_driver_row(row: object) -> None:
    assert row in TABLE.driver
    assert "NVIDIA" in row.source  # type: ignore[attr-defined]
    assert numbers(row.min_driver)[0] >= 400  # type: ignore[attr-defined]


@pytest.mark.parametrize("row", TABLE.image, ids=lambda r: f"{r.repository}:{r.tag}")
def test_image_row(row: ImageRow) -> None:
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", row.digest)
    assert row.verified is False, "nothing here can query a registry: digests are unverified"
    assert row.sources, "every digest names the public files it was taken from"
    for source in row.sources:
        assert REPO_AT_COMMIT.match(source), source
    if row.cuda:
        assert row.repository == "nvidia/cuda"
        assert row.tag.startswith(row.cuda + ".") and row.tag.endswith("-ubuntu24.04")
        assert row.python == "3.12", "Ubuntu 24.04's apt Python"
        assert TABLE.driver_for(row.cuda) is not None
    else:
        assert row.repository == "python" and "bookworm" in row.tag
        assert row.tag.startswith(row.python + "-")


def test_one_cpu_image_and_one_image_per_cuda() -> None:
    cudas = [i.cuda for i in TABLE.image]
    assert len(cudas) == len(set(cudas)) and "" in cudas


def test_digest_shared_by_distinct_tags_is_rejected() -> None:
    digests = [i.digest for i in TABLE.image]
    assert len(digests) == len(set(digests))


def test_table_rejects_unknown_keys_and_bad_digests() -> None:
    text = (ROOT / "compiler/data/compat.toml").read_text(encoding="utf-8")
    with pytest.raises(ValidationError):
        parse_table(text.replace("schema = 1", "schema = 1\nsurprise = 2"))
    with pytest.raises(ValidationError):
        parse_table(text.replace('digest = "sha256:', 'digest = "sha256:zz', 1))
    assert isinstance(parse_table(text), CompatTable)


def test_each_tracker_once_pinned_as_the_track_extra_installs_it() -> None:
    """The image's lock and `qlc run --local` (pyproject's track extra) get the same versions."""
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"][
        "optional-dependencies"
    ]
    assert sorted(row.tracker for row in TABLE.tracker) == ["mlflow", "wandb"]
    assert sorted(row.pin for row in TABLE.tracker) == sorted(extras["track"])
