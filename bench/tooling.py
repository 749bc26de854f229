"""Tooling targets from shared/BENCHMARK.md, as whole processes: figures, not asserts.

    python bench/tooling.py [--repeat 5] [--build]

- `qlc compile specs/guanaco.toml -o DIR` (target <= 1 s);
- with --build (needs Docker and a built tiny image): `qlc build specs/tiny.toml
  --base-image qlc-base:bookworm` of an unchanged spec, a cache hit (target <= 2 s).
Prints one JSON line per measurement: the median and every sample, in seconds.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)
    return time.perf_counter() - started


def measure(name: str, argv: list[str], repeat: int, target_s: float) -> None:
    timed(argv)  # warm the file cache: the figure is qlc's time, not the disk's
    samples = [round(timed(argv), 3) for _ in range(repeat)]
    median = statistics.median(samples)
    print(json.dumps({"measure": name, "median_s": median, "samples_s": samples,
                      "target_s": target_s, "met": median <= target_s}))  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--build", action="store_true", help="also time a cached qlc build")
    args = parser.parse_args()
    qlc = [sys.executable, "-m", "qlc"]
    with tempfile.TemporaryDirectory() as out:
        measure("qlc compile specs/guanaco.toml", [*qlc, "compile", "specs/guanaco.toml", "-o",
                str(Path(out) / "ctx")], args.repeat, 1.0)  # fmt: skip
    if args.build:
        build = [*qlc, "build", "specs/tiny.toml", "--base-image", "qlc-base:bookworm"]
        measure("qlc build specs/tiny.toml (unchanged: cache hit)", build, args.repeat, 2.0)


if __name__ == "__main__":
    main()
