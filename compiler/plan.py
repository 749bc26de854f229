"""The plan: a spec fully resolved and pinned. Only the plan reaches the templates.

A plan is a pure function of the spec text, the compatibility table and the lock; it is what
the image carries as /qlc/plan.json and what the training script reads.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field


class Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BaseImage(Frozen):
    repository: Annotated[str, Field(description="Image repository, e.g. 'nvidia/cuda'.")]
    tag: Annotated[str, Field(description="The tag the digest was recorded for.")]
    digest: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$", description="Pinned digest.")]
    verified: Annotated[
        bool, Field(description="Whether qlc resolved this digest from a registry itself.")
    ]
    source: Annotated[str, Field(description="Where the digest was found.")]
    python: Annotated[str, Field(description="Python major.minor the image provides.")]

    @property
    def reference(self) -> str:
        return f"{self.repository}@{self.digest}"


class Stack(Frozen):
    """Versions of the Python training stack, pinned exactly."""

    python: str
    torch: str
    cuda: Annotated[str, Field(description="CUDA major.minor the torch wheel was built for.")]
    transformers: str
    peft: str
    trl: str
    bitsandbytes: str
    accelerate: str
    datasets: str

    def requirements(self) -> list[str]:
        """Top-level requirements the lock is resolved from, sorted."""
        names = ("accelerate", "bitsandbytes", "datasets", "peft", "torch", "transformers", "trl")
        return [f"{name}=={getattr(self, name)}" for name in names]


class LockRef(Frozen):
    path: Annotated[str, Field(description="Lock file, relative to the spec file.")]
    sha256: Annotated[str, Field(description="sha256 of the lock file's bytes.")]
    input_hash: Annotated[str, Field(description="Hash of what the lock was resolved from.")]


class Plan(Frozen):
    qlc_version: str
    spec_name: Annotated[str, Field(description="Spec file name as given to the compiler.")]
    spec_sha256: Annotated[str, Field(description="sha256 of the spec file's bytes.")]
    spec: Annotated[dict[str, Any], Field(description="The effective spec, defaults filled in.")]
    base_image: BaseImage
    stack: Stack
    gpu_archs: Annotated[list[str], Field(description="Compute capabilities targeted.")]
    min_driver: Annotated[str, Field(description="Lowest NVIDIA driver for the CUDA target.")]
    lock: LockRef | None
