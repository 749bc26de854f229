"""The contract, cell by cell (issue 14): engine x memory x world size (1, and 2 through gloo)
x compute dtype, each a real CPU training run of the tiny model through its generated
train.py. For every cell the effective settings the run records are exactly what `qlc explain`
printed for its plan (the world-size rows differ only where a recorded decision applied the
plan's world-size rule), what actually computed (the observed dtypes of the base's, the
adapter's and the head's products, the adapter's weights, the optimizer's states) is what those
settings say, and nothing differs from the spec without a recorded substitution."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from qlc import contract
from qlc.compiler.context import compile_spec
from qlc.compiler.explain import settings_json
from qlc.compiler.plan import Plan

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "specs" / "tiny"
ENGINES, MEMORIES, DTYPES, WORLDS = ("reference", "fast"), ("standard", "lean"), (
    "float16", "bfloat16", "float32"), (1, 2)  # fmt: skip
CELLS = list(itertools.product(ENGINES, MEMORIES, DTYPES))
WORLD_DEPENDENT = {"world_size", "examples_per_step", "grad_accum"}


def cell_spec(engine: str, memory: str, dtype: str) -> bytes:
    """specs/tiny.toml, two short steps, at the cell's setting."""
    text = (REPO / "specs" / "tiny.toml").read_text()
    text = text.replace('compute_dtype = "float32"', f'compute_dtype = "{dtype}"')
    text = text.replace("max_steps = 12", "max_steps = 2").replace(
        "max_length = 128", "max_length = 48"
    )
    text = text.replace("batch_size = 4", "batch_size = 2")

    return text.replace("[train]", f'[train]\nengine = "{engine}"\nmemory = "{memory}"').encode()


def cell_name(cell: tuple[str, str, str]) -> str:
    return "-".join(cell)


def write_cells(root: Path, world: int) -> list[dict[str, str]]:
    cells = []
    for cell in CELLS:
        name = cell_name(cell)
        context = compile_spec(cell_spec(*cell), f"{name}.toml", None, require_lock=False)
        folder = root / "contexts" / name
        for path, data in context.files.items():
            (folder / path).parent.mkdir(parents=True, exist_ok=True)
            (folder / path).write_bytes(data)
        cells.append({"name": name, "script": str(folder / contract.SCRIPT_FILE),
                      "plan": str(folder / contract.PLAN_FILE), "out": str(root / "runs" / name),
                      "model": str(TINY / "model"), "data": str(TINY / "data.jsonl")})  # fmt: skip
    (root / "cells.json").write_text(json.dumps(cells))
    return cells


@pytest.fixture(scope="module", params=WORLDS, ids=lambda w: f"world{w}")
def ran(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[
    int, dict[str, Path]]:  # fmt: skip
    """Every cell run once for the world size: the run directory of each."""
    world: int = request.param
    root = tmp_path_factory.mktemp(f"matrix-world{world}")
    cells = write_cells(root, world)
    runner = [str(Path(__file__).with_name("matrix_cells.py")), str(root / "cells.json")]
    if world > 1:
        runner = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
                  *runner]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(contract.PROTOCOL_PREFIX)}
    env.update(PYTHONHASHSEED="0", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *runner], cwd=REPO / "specs", env=env,
                          capture_output=True, text=True, timeout=1500)  # fmt: skip
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-6000:]
    return world, {cell["name"]: Path(cell["out"]) for cell in cells}


def predicate_of(run_dir: Path) -> dict[str, Any]:
    statement = contract.read_manifest_file(run_dir / contract.MANIFEST_FILE)
    predicate: dict[str, Any] = statement["predicate"]
    return predicate


def explained(run_dir: Path) -> dict[str, Any]:
    """What `qlc explain` prints for the plan the run was given (its JSON settings)."""
    plan = Plan.model_validate_json((run_dir / contract.PLAN_FILE).read_bytes())
    return {name: row["value"] for name, row in settings_json(plan)["settings"].items()}


@pytest.mark.parametrize("cell", CELLS, ids=cell_name)
def test_each_cell_records_what_explain_printed_and_trains_it(
    cell: tuple[str, str, str], ran: tuple[int, dict[str, Path]]
) -> None:
    world, runs = ran
    run_dir = runs[cell_name(cell)]
    predicate = predicate_of(run_dir)
    assert predicate["status"] == "succeeded", predicate["error"]
    effective, before = dict(predicate["effective"]), explained(run_dir)
    assert effective.pop("eval_loss_definition") == contract.EVAL_LOSS_DEFINITION
    decided = {d["what"]: d for d in predicate["decisions"]}
    for name in sorted(set(before) | set(effective)):
        if name in WORLD_DEPENDENT and world > 1:
            assert decided["world size"]["chosen"] == world == effective["world_size"]
            continue
        assert effective.get(name) == before.get(name), name
    assert predicate["run"]["world_size"] == world
    assert predicate["run"]["examples_per_step"] == effective["examples_per_step"]
    assert_trained_as_set(effective, predicate["observed"], decided)
    assert_substitutions_only_where_asked(cell, predicate["substitutions"])


def assert_trained_as_set(
    settings: dict[str, Any], observed: dict[str, Any], decided: dict[str, dict[str, Any]]
) -> None:
    """The products that ran are in the dtypes the settings name: no silent substitution."""
    operands, outputs = observed["matmul_operands"], observed["matmul_outputs"]
    assert operands["base"] == [settings["base_matmul_dtype"]], operands
    assert operands["adapter"] == [settings["adapter_compute_dtype"]], operands
    assert outputs["head"] == [settings["logits_dtype"]], outputs
    assert observed["adapter_weights"] == [settings["adapter_weights_dtype"]]
    if settings["optimizer_state_bits"] == 8 and observed["optimizer_states"] == ["float32"]:
        # bitsandbytes keeps a small tensor's states in 32 bits (the tiny model's adapters are
        # all small): what ran says so in a recorded decision, not silently
        assert "32 for" in decided["train.engine.optimizer.state_bits"]["chosen"]
    else:
        state = "uint8" if settings["optimizer_state_bits"] == 8 else "float32"
        assert observed["optimizer_states"] == [state], observed


def assert_substitutions_only_where_asked(
    cell: tuple[str, str, str], substitutions: list[dict[str, Any]]
) -> None:
    _, memory, _ = cell
    if memory == "standard":
        assert substitutions == []
        return
    keys = {s["key"]: s for s in substitutions}
    assert (keys["train.optimizer"]["written"], keys["train.optimizer"]["effective"]) == (
        "adamw_torch", "adamw_8bit")  # fmt: skip
    assert all('train.memory = "lean"' in s["why"] for s in substitutions)
