"""Run the benchmark pipelines back to back and print one JSON line per pipeline.

    python bench/run.py --work /tmp/qlc-bench --pipelines seed,fast,lean,reference \
        [--shape 7b|tiny] [--contexts bench/.work] [--max-steps N] [--results FILE] [--cpu]

Pipelines: "seed" is bench/seed_recipe.py (the article's recipe, the baseline); "reference",
"fast" and "lean" run qlc's compiled train.py from the contexts that bench/contexts.py wrote,
with QLC_MODEL_PATH / QLC_DATA_PATH pointing at the locally built model and the data copy.
Each line carries tokens/s, train seconds, time to first step, peak allocated and reserved
memory, the mean loss of the last 10% of steps, the held-out loss, steps, tokens, wall time,
ratios against the seed run of the same invocation, versions and the GPU name.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GUANACO = ROOT / "data" / "guanaco-llama2-1k" / "train.parquet"  # the default --data
GIB = 2**30
VERSIONS = (
    "import importlib.metadata as m, json, torch\n"
    "names = ['torch', 'transformers', 'peft', 'trl', 'bitsandbytes', 'accelerate', 'datasets',"
    " 'liger-kernel']\n"
    "def v(n):\n"
    "    try: return m.version(n)\n"
    "    except Exception: return None\n"
    "gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None\n"
    "print(json.dumps({'versions': {n: v(n) for n in names}, 'cuda': torch.version.cuda,"
    " 'gpu': gpu}))\n"
)


def last_tenth_mean(losses: list[float]) -> float | None:
    if not losses:
        return None
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def run_logged(cmd: list[str], env: dict[str, str], log: Path, timeout: int) -> tuple[int, float]:
    start = time.perf_counter()
    with open(log, "w") as handle:
        try:
            code = subprocess.run(
                cmd, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=timeout, check=False
            ).returncode
        except subprocess.TimeoutExpired:
            code = 124
    return code, time.perf_counter() - start


def tail(path: Path, lines: int = 25) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def run_seed(args, model: Path, data: Path, out: Path, env: dict[str, str]) -> dict:
    cmd = [
        sys.executable,
        str(ROOT / "bench" / "seed_recipe.py"),
        "--model",
        str(model),
        "--data",
        str(data),
        "--out",
        str(out),
    ]
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps else []
    cmd += ["--cpu"] if args.cpu else []
    code, wall = run_logged(cmd, env, out.with_suffix(".log"), args.timeout)
    metrics_file = out / "seed_metrics.json"
    if code != 0 or not metrics_file.exists():
        return {
            "status": f"failed ({code})",
            "wall_s": wall,
            "log_tail": tail(out.with_suffix(".log")),
        }
    m = json.loads(metrics_file.read_text())
    return {
        "status": "ok",
        "tokens_per_s": m["tokens_per_s"],
        "train_seconds": m["train_seconds"],
        "time_to_first_step_s": m["time_to_first_step_s"],
        "peak_allocated": m.get("peak_allocated"),
        "peak_reserved": m.get("peak_reserved"),
        "final_loss_last10pct": last_tenth_mean(m["step_losses"]),
        "heldout_loss": m["eval_loss"],
        "steps": m["steps"],
        "tokens_trained": m["tokens_trained"],
        "wall_s": wall,
    }


def run_qlc(args, pipeline: str, model: Path, data: Path, out: Path, env: dict[str, str]) -> dict:
    # "NAME:KEY=VAL,KEY=VAL" runs the context with those environment variables; "-profile"
    # turns on the fast engine's profiler (contract.ENV_PROFILE_STEPS) for a few steps.
    name, _, knobs = pipeline.partition(":")
    extra = dict(kv.split("=", 1) for kv in knobs.split(",") if kv)
    if name.endswith("-profile"):
        name, extra["QLC_PROFILE_STEPS"] = name.removesuffix("-profile"), "3"
    context = args.contexts / f"ctx-{name}"
    env = {**env, **extra}
    env = {
        **env,
        "QLC_MODEL_PATH": str(model),
        "QLC_DATA_PATH": str(data),
        "QLC_OUTPUT_DIR": str(out),
        "QLC_PLAN": str(context / "plan.json"),
    }
    code, wall = run_logged(
        [sys.executable, str(context / "train.py")], env, out.with_suffix(".log"), args.timeout
    )
    rows = []
    if (out / "metrics.jsonl").exists():
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = next((r for r in reversed(rows) if r.get("event") == "summary"), None)
    if code != 0 or summary is None:
        return {
            "status": f"failed ({code})",
            "wall_s": wall,
            "log_tail": tail(out.with_suffix(".log")),
        }
    steps = [r for r in rows if r.get("event", "train") == "train" and r.get("loss") is not None]
    first = summary.get("time_to_first_step_s")
    return {
        "status": "ok",
        "tokens_per_s": summary["tokens_per_s"],
        "train_seconds": summary["train_seconds"],
        "time_to_first_step_s": first
        if first is not None
        else (steps[0]["elapsed_s"] if steps else None),
        "peak_allocated": summary.get("peak_memory_allocated"),
        "peak_reserved": summary.get("peak_memory_reserved") or summary.get("peak_memory_bytes"),
        # the whole process (load, train, eval, sample), from train.py
        "peak_reserved_process": summary.get("peak_memory_bytes"),
        "base_weights": json.loads((out / "manifest.json").read_text())["predicate"]
        .get("effective", {})
        .get("base_weights")
        if (out / "manifest.json").exists()
        else None,
        "final_loss_last10pct": last_tenth_mean([r["loss"] for r in steps]),
        "heldout_loss": summary.get("eval_loss"),
        "loss_curve": [round(float(r["loss"]), 4) for r in steps],
        "steps": summary.get("steps"),
        "tokens_trained": summary.get("tokens_trained"),
        "wall_s": wall,
        "decisions": json.loads((out / "manifest.json").read_text())["predicate"].get("decisions")
        if (out / "manifest.json").exists()
        else None,
    }


def add_estimate(record: dict, path: Path) -> None:
    """The preflight estimate made at compile time (bench/contexts.py) against the measurement."""
    if not path.is_file() or not record.get("peak_reserved"):
        return
    predicted = json.loads(path.read_text())["bytes"]
    record["predicted_peak_reserved_gib"] = round(predicted / GIB, 2)
    record["predicted_vs_measured"] = predicted / record["peak_reserved"]


def add_ratios(record: dict, seed: dict | None) -> None:
    if not seed or seed.get("status") != "ok" or record.get("status") != "ok":
        return
    ratio = lambda key: record[key] / seed[key] if record.get(key) and seed.get(key) else None  # noqa: E731
    record["speedup_vs_seed"] = ratio("tokens_per_s")
    record["reserved_vs_seed"] = ratio("peak_reserved")
    record["final_loss_vs_seed"] = ratio("final_loss_last10pct")
    record["heldout_loss_vs_seed"] = ratio("heldout_loss")


def smoothed(curve: list[float], window: int = 10) -> list[float]:
    return [sum(curve[i : i + window]) / window for i in range(len(curve) - window + 1)]


def add_scaling(record: dict, one_gpu: dict | None) -> None:
    """ddpN (fastN) against ddp1 (fast1) of the same call: throughput ratio and how far the
    loss curves part."""
    if not one_gpu or one_gpu.get("status") != "ok" or record.get("status") != "ok":
        return
    record["speedup_vs_1gpu"] = record["tokens_per_s"] / one_gpu["tokens_per_s"]
    mine, theirs = record["loss_curve"], one_gpu["loss_curve"]
    if len(mine) != len(theirs) or len(mine) < 10:
        record["loss_curve_vs_1gpu"] = f"not comparable: {len(mine)} vs {len(theirs)} steps"
        return
    pairs = list(zip(smoothed(mine), smoothed(theirs), strict=True))
    record["loss_curve_vs_1gpu"] = {
        "steps": len(mine),
        "max_rel_diff_10step_mean": max(abs(a - b) / b for a, b in pairs),
        "mean_rel_diff_10step_mean": sum(abs(a - b) / b for a, b in pairs) / len(pairs),
        "final_loss_ratio": record["final_loss_last10pct"] / one_gpu["final_loss_last10pct"],
        "heldout_loss_ratio": (record["heldout_loss"] or 0) / (one_gpu["heldout_loss"] or 1),
    }


def prepare(args) -> tuple[Path, Path, dict[str, str]]:
    args.work.mkdir(parents=True, exist_ok=True)
    data = args.work / "data" / "train.parquet"
    data.parent.mkdir(exist_ok=True)
    shutil.copyfile(args.data, data)
    model = args.work / f"model-{args.shape}"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / "assets.py"),
            "--out",
            str(model),
            "--shape",
            args.shape,
            "--data",
            str(data),
        ],
        env=env,
        check=True,
    )
    return model, data, env


RATIO_KEYS = ("speedup_vs_seed", "reserved_vs_seed", "final_loss_vs_seed", "heldout_loss_vs_seed")


def ratio_lines(records: list[dict]) -> list[dict]:
    """Every pipeline against the seed run among `records` (one call), whatever their order."""
    seed = next((r for r in records if r.get("pipeline") == "seed"), None)
    lines = []
    for record in records:
        row = {k: v for k, v in record.items() if k not in RATIO_KEYS}
        add_ratios(row, seed)
        if any(k in row for k in RATIO_KEYS):
            lines.append({"ratios": record["pipeline"], **{k: row.get(k) for k in RATIO_KEYS}})
    return lines


def main() -> None:
    if sys.argv[1:2] == ["--ratios"]:  # python bench/run.py --ratios RESULTS.jsonl
        records = [json.loads(line) for line in Path(sys.argv[2]).read_text().splitlines()]
        for line in ratio_lines([r for r in records if "pipeline" in r]):
            print(json.dumps(line))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("/tmp/qlc-bench"))
    parser.add_argument(
        "--pipelines",
        default="seed,fast,lean,reference",
        help="separated by '/' when a pipeline carries knobs (fast:KEY=VAL,...)",
    )
    parser.add_argument("--shape", default="7b")
    parser.add_argument("--contexts", type=Path, default=ROOT / "bench" / ".work")
    parser.add_argument("--data", type=Path, default=GUANACO)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--timeout", type=int, default=560, help="seconds per pipeline at most")
    parser.add_argument("--deadline", type=int, default=None, help="seconds for the whole run")
    parser.add_argument("--results", type=Path, default=None)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()
    started = time.perf_counter()
    model, data, env = prepare(args)
    info = json.loads(
        subprocess.run(
            [sys.executable, "-c", VERSIONS], env=env, check=True, capture_output=True, text=True
        ).stdout
    )
    seed = None
    one_gpu: dict[str, dict] = {}  # "ddp" / "fast" -> its 1-GPU record
    records: list[dict] = []
    sep = "/" if "/" in args.pipelines or ":" in args.pipelines else ","
    for pipeline in args.pipelines.split(sep):
        out = args.work / "runs" / re.sub(r"[^A-Za-z0-9._-]", "_", pipeline)
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        if args.deadline:
            args.timeout = min(args.timeout, int(args.deadline - (time.perf_counter() - started)))
            if args.timeout < 30:
                print(json.dumps({"pipeline": pipeline, "status": "skipped: out of time"}))
                continue
        if pipeline == "seed":
            record = run_seed(args, model, data, out, env)
        else:
            record = run_qlc(args, pipeline, model, data, out, env)
        record = {"pipeline": pipeline, "shape": args.shape, **record}
        for key in ("peak_allocated", "peak_reserved", "peak_reserved_process"):
            if record.get(key):
                record[key + "_gib"] = round(record[key] / GIB, 2)
        name = pipeline.partition(":")[0].removesuffix("-profile")
        estimate = "seed-estimate.json" if name == "seed" else f"ctx-{name}/estimate.json"
        add_estimate(record, args.contexts / estimate)
        if pipeline == "seed":
            seed = record
        if re.fullmatch(r"(ddp|fast)1", pipeline):
            one_gpu[pipeline[:-1]] = record
        elif re.fullmatch(r"(ddp|fast)\d+", pipeline):
            add_scaling(record, one_gpu.get(pipeline.rstrip("0123456789")))
        add_ratios(record, seed)
        record.update(info)
        records.append(record)
        emit(record, args.results)
    if seed is not None and records[0] is not seed:  # pipelines that ran before the seed
        for line in ratio_lines(records):
            emit(line, args.results)


def emit(record: dict, results: Path | None) -> None:
    line = json.dumps(record)
    print(line, flush=True)
    if results:
        with open(results, "a") as handle:
            handle.write(line + "\n")


if __name__ == "__main__":
    main()
