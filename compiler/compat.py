"""The compatibility table (compiler/data/compat.toml) as typed, frozen data.

The table is package data read with importlib.resources, so resolving stays pure: no network,
no environment. tools/regen_compat.py writes it; tests/compiler/test_compat.py checks each row.
"""

from __future__ import annotations

import tomllib
from functools import cache
from importlib import resources
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

MAJOR_MINOR = r"^\d+\.\d+$"
DIGEST = r"^sha256:[0-9a-f]{64}$"


class Row(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class TorchBuild(Row):
    """A torch release and the CUDA build of its PyPI Linux x86_64 wheel."""

    version: Annotated[str, Field(pattern=r"^\d+\.\d+\.\d+$")]
    cuda: Annotated[str, Field(pattern=MAJOR_MINOR)]
    requires_python: str
    archs: Annotated[tuple[Annotated[str, Field(pattern=MAJOR_MINOR)], ...], Field(min_length=1)]
    evidence: Annotated[str, Field(min_length=1)]


class StackRow(Row):
    """The training-stack versions qlc ships with one torch release."""

    torch: str
    transformers: str
    peft: str
    trl: str
    bitsandbytes: str
    accelerate: str
    datasets: str
    # fsspec backends for object-store inputs, locked only into plans that read them: each
    # must accept the fsspec version the stack resolves to (s3fs pins fsspec exactly).
    s3fs: str
    gcsfs: str
    adlfs: str

    def object_store_pins(self, schemes: list[str]) -> list[str]:
        packages = {"s3://": "s3fs", "gs://": "gcsfs", "az://": "adlfs"}
        return sorted(f"{packages[s]}=={getattr(self, packages[s])}" for s in schemes)


class TrackerPin(Row):
    """The package (and version) a tracker needs in the image, added to the lock when a spec
    turns the tracker on."""

    tracker: Literal["wandb", "mlflow"]
    package: str
    version: Annotated[str, Field(pattern=r"^\d+(\.\d+)+$")]
    note: Annotated[str, Field(min_length=1)]

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"


class BitsandbytesBuild(Row):
    version: str
    cuda_builds: tuple[Annotated[str, Field(pattern=MAJOR_MINOR)], ...]
    evidence: Annotated[str, Field(min_length=1)]


class DriverFloor(Row):
    cuda: Annotated[str, Field(pattern=MAJOR_MINOR)]
    min_driver: Annotated[str, Field(pattern=r"^\d+(\.\d+)*$")]
    source: Annotated[str, Field(min_length=1)]


class ImageRow(Row):
    """A base image pinned by digest; `cuda` is empty for the CPU image."""

    repository: str
    tag: str
    digest: Annotated[str, Field(pattern=DIGEST)]
    cuda: Annotated[str, Field(pattern=r"^(\d+\.\d+)?$")]
    python: Annotated[str, Field(pattern=MAJOR_MINOR)]
    python_from: str
    verified: bool
    sources: tuple[str, ...]
    note: str

    @property
    def source(self) -> str:
        return "; ".join(self.sources) if self.sources else "(no public source recorded)"


class CompatTable(Row):
    schema_: Annotated[int, Field(alias="schema")]
    default_torch: str
    torch: tuple[TorchBuild, ...]
    stack: tuple[StackRow, ...]
    bitsandbytes: tuple[BitsandbytesBuild, ...]
    driver: tuple[DriverFloor, ...]
    image: tuple[ImageRow, ...]
    tracker: tuple[TrackerPin, ...]

    def torch_build(self, version: str) -> TorchBuild | None:
        return next((row for row in self.torch if row.version == version), None)

    def stack_for(self, torch: str) -> StackRow | None:
        return next((row for row in self.stack if row.torch == torch), None)

    def bitsandbytes_build(self, version: str) -> BitsandbytesBuild | None:
        return next((row for row in self.bitsandbytes if row.version == version), None)

    def driver_for(self, cuda: str) -> DriverFloor | None:
        return next((row for row in self.driver if row.cuda == cuda), None)

    def cuda_image(self, cuda: str) -> ImageRow | None:
        return next((row for row in self.image if row.cuda == cuda), None)

    def cpu_image(self) -> ImageRow | None:
        return next((row for row in self.image if row.cuda == ""), None)


def parse_table(text: str) -> CompatTable:
    """Validate table text (raises pydantic.ValidationError or tomllib.TOMLDecodeError)."""
    return CompatTable.model_validate(tomllib.loads(text), strict=False)


@cache
def load_table() -> CompatTable:
    """The compatibility table shipped with qlc."""
    text = resources.files("qlc.compiler").joinpath("data", "compat.toml").read_text("utf-8")
    return parse_table(text)
