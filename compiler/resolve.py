"""resolve: Spec -> Plan. Pins the base image, the training stack, GPU archs and driver floor;
the training settings are decided by compiler/settle.py.

Pure: everything comes from the spec and the compatibility table (compiler/data/compat.toml).
An unsupported combination is a ResolveError naming the spec key and the nearest supported
choice, so the CLI can print it as `FILE:LINE:COL: runtime.cuda: ...`.
"""

from __future__ import annotations

from collections.abc import Iterable

from qlc.compiler.compat import CompatTable, ImageRow, TorchBuild, load_table
from qlc.compiler.plan import BaseImage, LockRef, Plan, Stack, read_schemes
from qlc.compiler.settle import SettleError, settle
from qlc.compiler.spec import Runtime, Spec


class ResolveError(ValueError):
    """The spec asks for something qlc's compatibility table cannot provide."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(message)
        self.key = key


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def _nearest(wanted: str, choices: Iterable[str]) -> str:
    """The choice numerically closest to `wanted` (ties: the newer one)."""
    want = _numbers(wanted)

    def distance(choice: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        have = _numbers(choice)
        width = max(len(want), len(have))
        a = want + (0,) * (width - len(want))
        b = have + (0,) * (width - len(have))
        return tuple(abs(x - y) for x, y in zip(a, b, strict=True)), tuple(-n for n in b)

    return min(choices, key=distance)


def _listing(choices: Iterable[str]) -> str:
    return ", ".join(sorted(set(choices), key=_numbers))


def _select_torch(runtime: Runtime, table: CompatTable) -> TorchBuild:
    rows = sorted(table.torch, key=lambda row: _numbers(row.version), reverse=True)
    if runtime.torch is not None:
        wanted = runtime.torch
        matches = [r for r in rows if r.version == wanted or r.version.startswith(wanted + ".")]
        if not matches:
            nearest = _nearest(wanted, (r.version for r in rows))
            raise ResolveError(
                "runtime.torch",
                f'torch {wanted} is not supported; nearest supported: "{nearest}" '
                f"(supported: {_listing(r.version for r in rows)})",
            )
        rows = matches
    if runtime.cuda is not None and runtime.gpus > 0:
        with_cuda = [r for r in rows if r.cuda == runtime.cuda]
        if not with_cuda:
            nearest = _nearest(runtime.cuda, (r.cuda for r in rows))
            which = f"torch {rows[0].version}" if runtime.torch else "any supported torch"
            raise ResolveError(
                "runtime.cuda",
                f"CUDA {runtime.cuda} is not available with {which} (PyPI wheels are built for "
                f'CUDA {_listing(r.cuda for r in rows)}); nearest supported: "{nearest}"',
            )
        rows = with_cuda
    if runtime.torch is None and runtime.cuda is None:
        default = table.torch_build(table.default_torch)
        if default is not None:
            return default
    return rows[0]


def _check_cpu_runtime(runtime: Runtime) -> None:
    if runtime.cuda is not None:
        raise ResolveError(
            "runtime.cuda",
            "runtime.cuda needs a GPU: remove it, or set runtime.gpus to 1 or more",
        )
    if runtime.gpu_archs is not None:
        raise ResolveError(
            "runtime.gpu_archs",
            "runtime.gpu_archs needs a GPU: remove it, or set runtime.gpus to 1 or more",
        )


def _runs_on(arch: str, built: tuple[str, ...]) -> bool:
    """A cubin for major.m runs on major.n for n >= m (same major): NVIDIA's binary rule."""
    major, minor = _numbers(arch)
    return any(b[0] == major and b[1] <= minor for b in (_numbers(x) for x in built))


def _gpu_archs(runtime: Runtime, build: TorchBuild) -> list[str]:
    if runtime.gpu_archs is None:
        return list(build.archs)
    for arch in runtime.gpu_archs:
        if not _runs_on(arch, build.archs):
            raise ResolveError(
                "runtime.gpu_archs",
                f"compute capability {arch} has no kernels in torch {build.version} "
                f"(CUDA {build.cuda}), which supports {_listing(build.archs)}; nearest "
                f'supported: "{_nearest(arch, build.archs)}"',
            )
    return sorted(set(runtime.gpu_archs), key=_numbers)


def _select_image(runtime: Runtime, build: TorchBuild, table: CompatTable) -> ImageRow:
    image = table.cuda_image(build.cuda) if runtime.gpus > 0 else table.cpu_image()
    if image is None:
        what = f"CUDA {build.cuda}" if runtime.gpus > 0 else "CPU"
        raise ResolveError("runtime", f"qlc's compatibility table has no {what} base image")
    if runtime.python is not None and runtime.python != image.python:
        kind = "GPU" if runtime.gpus > 0 else "CPU"
        raise ResolveError(
            "runtime.python",
            f"Python {runtime.python} is not available in the {kind} base image "
            f'{image.repository}:{image.tag}; nearest supported: "{image.python}"',
        )
    return image


def _stack(build: TorchBuild, python: str, table: CompatTable, schemes: list[str],
           trackers: list[str]) -> Stack:  # fmt: skip
    """The pinned stack: the training packages, the object-store backends the inputs need and
    the client packages of the trackers the spec turns on."""
    row = table.stack_for(build.version)
    if row is None:
        raise ResolveError(
            "runtime.torch", f"no training stack is pinned for torch {build.version}"
        )
    return Stack(
        python=python,
        torch=row.torch,
        cuda=build.cuda,
        transformers=row.transformers,
        peft=row.peft,
        trl=row.trl,
        bitsandbytes=row.bitsandbytes,
        accelerate=row.accelerate,
        datasets=row.datasets,
        object_stores=row.object_store_pins(schemes),
        trackers=sorted(pin.pin for pin in table.tracker if pin.tracker in trackers),
    )


def _check_bitsandbytes(stack: Stack, table: CompatTable) -> None:
    build = table.bitsandbytes_build(stack.bitsandbytes)
    if build is None or stack.cuda not in build.cuda_builds:
        builds = _listing(build.cuda_builds) if build else "none recorded"
        raise ResolveError(
            "runtime.cuda",
            f"bitsandbytes {stack.bitsandbytes} has no CUDA {stack.cuda} build "
            f"(its builds: {builds})",
        )


def _min_driver(runtime: Runtime, cuda: str, table: CompatTable) -> str:
    if runtime.gpus == 0:
        return ""
    floor = table.driver_for(cuda)
    if floor is None:
        raise ResolveError("runtime.cuda", f"no minimum NVIDIA driver is recorded for CUDA {cuda}")
    return str(floor.min_driver)


def resolve(
    spec: Spec,
    *,
    spec_name: str,
    spec_sha256: str,
    qlc_version: str,
    lock: LockRef | None,
) -> Plan:
    """Resolve a spec into a pinned plan. Raises ResolveError for unsupported combinations.

    CPU plans (runtime.gpus = 0) still pin the PyPI torch wheel (a CUDA build) so that a
    lock resolves the same way everywhere; they target no GPU arch and need no driver.
    """
    table = load_table()
    runtime = spec.runtime
    if runtime.gpus == 0:
        _check_cpu_runtime(runtime)
    build = _select_torch(runtime, table)
    image = _select_image(runtime, build, table)
    try:
        sections = settle(spec)
    except SettleError as error:
        raise ResolveError(error.key, str(error)) from None
    schemes = read_schemes(sections["model"], sections["data"])
    stack = _stack(build, image.python, table, schemes, sections["track"].clients())
    if runtime.gpus > 0:
        _check_bitsandbytes(stack, table)
    return Plan(
        qlc_version=qlc_version,
        spec_name=spec_name,
        spec_sha256=spec_sha256,
        **sections,
        base_image=BaseImage(
            repository=image.repository,
            tag=image.tag,
            digest=image.digest,
            verified=image.verified,
            source=image.source,
            python=image.python,
        ),
        stack=stack,
        gpu_archs=_gpu_archs(runtime, build) if runtime.gpus > 0 else [],
        min_driver=_min_driver(runtime, build.cuda, table),
        lock=lock,
    )
