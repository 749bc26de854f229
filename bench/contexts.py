"""Compile the benchmark's qlc pipelines into build contexts (train.py, plan.json, the trainer).

    python bench/contexts.py --out bench/.work [--cpu] [--max-steps N]

Each pipeline is specs/guanaco.toml (the seed recipe as a qlc spec) with its lock, changed only
where the benchmark needs it: data.eval_fraction = 0.05 (the held-out rows every pipeline is
scored on), train.logging_steps = 1 (per-step losses), and the engine / memory setting under
test. `--cpu` makes the CPU-size variant: runtime.gpus = 0 and float32 compute.
Run it where qlc is installed; the device machine then needs only the written contexts.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PIPELINES = {
    "reference": {"engine": "reference", "memory": "standard"},
    "fast": {"engine": "fast", "memory": "standard"},
    "lean": {"engine": "fast", "memory": "lean"},
    # the 4-bit base kept on the GPU, dequantized per matmul, every layer recomputed (issue 15)
    "compact": {"engine": "fast", "memory": "compact"},
    # Data parallel (issue 8): the reference engine at 8 examples per optimizer step on 1 and 2
    # GPUs (4 per device x 2 accumulated, or 4 per device x 2 processes).
    "ddp1": {"engine": "reference", "memory": "standard", "gpus": 1, "examples_per_step": 8},
    "ddp2": {"engine": "reference", "memory": "standard", "gpus": 2, "examples_per_step": 8},
    # the same on the fast engine (data parallel: each process trains half of every step)
    "fast1": {"engine": "fast", "memory": "standard", "gpus": 1, "examples_per_step": 8},
    "fast2": {"engine": "fast", "memory": "standard", "gpus": 2, "examples_per_step": 8},
}


def set_key(text: str, section: str, key: str, value: str) -> str:
    """Set `key = value` inside [section] of a TOML text (added at the section's end if absent)."""
    pattern = re.compile(rf"(^\[{re.escape(section)}\]\n)(.*?)(?=^\[|\Z)", re.M | re.S)
    match = pattern.search(text)
    if match is None:
        return text.rstrip("\n") + f"\n\n[{section}]\n{key} = {value}\n"
    body = match.group(2)
    line = re.compile(rf"^{re.escape(key)}\s*=.*$", re.M)
    body = (
        line.sub(f"{key} = {value}", body)
        if line.search(body)
        else body.rstrip("\n") + (f"\n{key} = {value}\n\n")
    )
    return text[: match.start(2)] + body + text[match.end(2) :]


def drop_key(text: str, key: str) -> str:
    return re.sub(rf"^{re.escape(key)}\s*=.*\n", "", text, flags=re.M)


def bench_spec(base: str, pipeline: str, cpu: bool, max_steps: int | None) -> str:
    settings: dict = PIPELINES[pipeline]
    text = set_key(base, "job", "name", f'"bench-{pipeline}"')
    text = set_key(text, "data", "eval_fraction", "0.05")
    text = set_key(text, "train", "logging_steps", "1")
    text = set_key(text, "train", "engine", f'"{settings["engine"]}"')
    text = set_key(text, "train", "memory", f'"{settings["memory"]}"')
    if "examples_per_step" in settings:
        per_step = str(settings["examples_per_step"])
        text = set_key(drop_key(text, "grad_accum"), "train", "examples_per_step", per_step)
        text = set_key(text, "runtime", "gpus", str(settings["gpus"]))
    if max_steps:
        text = set_key(drop_key(text, "epochs"), "train", "max_steps", str(max_steps))
    if cpu:
        text = set_key(text, "runtime", "gpus", "0")
        text = set_key(text, "quantization", "compute_dtype", '"float32"')
        text = set_key(text, "train", "optimizer", '"adamw_torch"')
    return text


def write_estimate(path: Path, estimate) -> None:
    """The preflight estimate (`qlc explain --gpu H100`) beside what it predicts, for run.py."""
    path.write_text(json.dumps({"setting": estimate.setting, "bytes": estimate.total_bytes}))


def main() -> None:
    from qlc.compiler.context import compile_spec, plan_spec
    from qlc.compiler.memory import estimate, estimate_seed_recipe
    from qlc.compiler.shapes import find_gpu

    h100 = find_gpu("H100")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / ".work")
    parser.add_argument("--cpu", action="store_true")
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--pipelines", default="reference,fast,lean")
    args = parser.parse_args()
    base = (ROOT / "specs" / "guanaco.toml").read_text()
    lock = (ROOT / "specs" / "guanaco.lock").read_bytes()
    seed_plan, _ = plan_spec(bench_spec(base, "reference", False, None).encode(), "seed.toml")
    args.out.mkdir(parents=True, exist_ok=True)
    write_estimate(args.out / "seed-estimate.json", estimate_seed_recipe(seed_plan))
    for pipeline in args.pipelines.split(","):
        text = bench_spec(base, pipeline, args.cpu, args.max_steps)
        # The CPU variant targets no image, so the GPU image's lock does not apply to it.
        context = compile_spec(
            text.encode(),
            f"bench-{pipeline}.toml",
            None if args.cpu else lock,
            require_lock=not args.cpu,
        )
        target = args.out / f"ctx-{pipeline}"
        target.mkdir(parents=True, exist_ok=True)
        for name, data in context.files.items():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_bytes(data)
        write_estimate(target / "estimate.json", estimate(context.plan, gpu=h100))
        print(
            json.dumps(
                {"pipeline": pipeline, "context": str(target), "content_hash": context.content_hash}
            )
        )


if __name__ == "__main__":
    main()
