"""llama.cpp's tools as qlc uses them: its converter and its quantizer, at one pinned version.

The converter (convert_hf_to_gguf.py with its `conversion` package and `gguf-py`) is not in
any wheel on PyPI: it ships in the llama-cpp-python source distribution, under
vendor/llama.cpp, beside the llama.cpp sources that the installed llama_cpp library was built
from. qlc takes it from there, at the version of the installed llama_cpp (so the file is
written and read by the same llama.cpp): `pip download` of that sdist, checked against the
sha256 pinned here, unpacked once into qlc's cache ($XDG_CACHE_HOME/qlc, default ~/.cache/qlc).
LLAMA_CPP_DIR_ENV names a llama.cpp checkout to use instead (offline machines).

k-quants (q4_k_m) are made by llama.cpp's own quantizer (llama_model_quantize through
llama-cpp-python), from a lossless 16-bit conversion; f16 and q8_0 come straight from the
converter.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

LLAMA_CPP_PYTHON = "0.3.36"
# sha256 of llama_cpp_python-0.3.36.tar.gz as PyPI serves it
SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CPP_DIR_ENV = "QLC_LLAMA_CPP_DIR"
CONVERTER = "convert_hf_to_gguf.py"
VENDORED = "vendor/llama.cpp"
KEEP = (CONVERTER, "conversion/", "gguf-py/", "LICENSE")
CONVERT_TIMEOUT_S = 3600


class GgufToolError(Exception):
    """llama.cpp's converter or quantizer is missing or failed; the message says how to fix."""


@dataclass(frozen=True)
class Quant:
    name: str  # what --quant says
    converter_outtype: str | None  # what convert_hf_to_gguf.py writes (None: the merge's dtype)
    llama_ftype: int | None  # then llama_model_quantize to this LLAMA_FTYPE_*, if any


# LLAMA_FTYPE_MOSTLY_Q4_K_M = 15 (llama.h); the others need no second step.
QUANTS = {
    "f16": Quant("f16", "f16", None),
    "q8_0": Quant("q8_0", "q8_0", None),
    "q4_k_m": Quant("q4_k_m", None, 15),
}


def installed_llama_cpp() -> str:
    try:
        import llama_cpp
    except ImportError:
        raise GgufToolError(
            "llama-cpp-python is not installed: pip install 'qlc[gguf]' (it builds llama.cpp "
            "from source: a C/C++ compiler and cmake are needed)"
        ) from None
    version = str(llama_cpp.__version__)
    if version != LLAMA_CPP_PYTHON:
        raise GgufToolError(
            f"llama-cpp-python {version} is installed; qlc's GGUF path is pinned to "
            f"{LLAMA_CPP_PYTHON}: pip install 'llama-cpp-python=={LLAMA_CPP_PYTHON}'"
        )
    return version


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "qlc"


def unpack_converter(sdist: Path, target: Path) -> None:
    """The converter's files from the sdist's vendor/llama.cpp, into target (atomically)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    with tarfile.open(sdist, "r:gz") as archive:
        for member in archive.getmembers():
            _, _, inside = member.name.partition(f"/{VENDORED}/")
            if inside and member.isfile() and inside.startswith(KEEP):
                member.name = inside
                archive.extract(member, staging, filter="data")
    os.replace(staging, target)


def download_sdist(directory: Path) -> Path:
    requirements = directory / "requirements.txt"
    requirements.write_text(
        f"llama-cpp-python=={LLAMA_CPP_PYTHON} --hash=sha256:{SDIST_SHA256}\n", encoding="utf-8"
    )
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:"]
    command += ["--require-hashes", "-r", str(requirements), "-d", str(directory)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    found = sorted(directory.glob("llama_cpp_python-*.tar.gz"))
    if done.returncode != 0 or not found:
        raise GgufToolError(
            f"cannot download llama-cpp-python {LLAMA_CPP_PYTHON}'s source (its converter): "
            f"{(done.stderr or done.stdout).strip()[-600:]}; or set {LLAMA_CPP_DIR_ENV} to a "
            "llama.cpp checkout of the same version"
        )
    return found[0]


def converter_dir() -> Path:
    """A directory holding convert_hf_to_gguf.py, conversion/ and gguf-py/."""
    given = os.environ.get(LLAMA_CPP_DIR_ENV)
    if given:
        if not (Path(given) / CONVERTER).is_file():
            raise GgufToolError(f"{LLAMA_CPP_DIR_ENV}={given}: no {CONVERTER} there")
        return Path(given)
    version = installed_llama_cpp()
    target = cache_root() / f"llama-cpp-python-{version}"
    if not (target / CONVERTER).is_file():
        with tempfile.TemporaryDirectory(prefix="qlc-llama-cpp-") as work:
            unpack_converter(download_sdist(Path(work)), target)
    return target


def convert(model_dir: Path, outfile: Path, outtype: str) -> str:
    """llama.cpp's converter on model_dir; its log (the fallback it took, if any)."""
    command = [sys.executable, "-m", "qlc.runtime.gguf_convert", str(converter_dir())]
    command += [str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    done = subprocess.run(command, capture_output=True, text=True, timeout=CONVERT_TIMEOUT_S)
    if done.returncode != 0 or not outfile.is_file():
        raise GgufToolError(
            f"llama.cpp's converter failed on {model_dir} ({done.returncode}): "
            f"{done.stderr.strip()[-2000:]}"
        )
    return done.stderr


def quantize(source: Path, target: Path, ftype: int) -> None:
    """llama.cpp's quantizer (llama_model_quantize), all threads, default rules."""
    import ctypes

    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = os.cpu_count() or 1
    status = llama_cpp.llama_model_quantize(
        str(source).encode(), str(target).encode(), ctypes.byref(params)
    )
    if status != 0 or not target.is_file():
        raise GgufToolError(f"llama.cpp's quantizer failed on {source} (status {status})")


def make_gguf(merged_dir: Path, outfile: Path, quant: Quant, merged_dtype: str) -> str:
    """merged_dir (a verified HF merge) as a GGUF of `quant`; the converter's log."""
    if quant.converter_outtype is not None:
        return convert(merged_dir, outfile, quant.converter_outtype)
    assert quant.llama_ftype is not None
    lossless = "bf16" if merged_dtype == "bf16" else "f16"  # the merge's own dtype, exactly
    intermediate = outfile.with_name(f".{outfile.name}.{lossless}")
    try:
        log = convert(merged_dir, intermediate, lossless)
        quantize(intermediate, outfile, quant.llama_ftype)
    finally:
        intermediate.unlink(missing_ok=True)
    return log
