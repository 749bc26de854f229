"""FSDP on CPU (slow): real 2-process runs of specs/tiny.toml through gloo (QLC_NPROC=2) with
runtime.distributed = "fsdp", one per optimizer the compiler accepts under FSDP (bitsandbytes'
are refused there: tests/compiler/test_settle.py). Each trains to the end with the model
sharded over both processes, saves a checkpoint and one adapter, and records what ran."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from trainer_support import compile_to, edited_spec, manifest, metrics, run_train

from qlc import contract
from qlc.compiler.settle import OPTIMIZERS

pytestmark = pytest.mark.slow
BITSANDBYTES = {"paged_adamw_32bit", "paged_adamw_8bit", "adamw_8bit"}
ACCEPTED = sorted(set(OPTIMIZERS) - BITSANDBYTES)


def test_the_accepted_optimizers_are_every_one_but_bitsandbytes() -> None:
    assert ACCEPTED == ["adafactor", "adamw_torch", "adamw_torch_fused", "sgd"]


@pytest.mark.parametrize("optimizer", ACCEPTED)
def test_fsdp_trains_with_each_accepted_optimizer(optimizer: str, tmp_path: Path) -> None:
    source = edited_spec(
        "tiny.toml",
        {
            "[runtime]\n": '[runtime]\ndistributed = "fsdp"\n',
            'compute_dtype = "float32"': 'compute_dtype = "float32"\nstorage_dtype = "float32"',
            'optimizer = "adamw_torch"': f'optimizer = "{optimizer}"',
            "max_steps = 12": "max_steps = 2",
            "eval_steps = 6": "eval_steps = 2",
            "save_steps = 4": "save_steps = 2",
        },
    )
    context = compile_to("tiny.toml", tmp_path / "ctx", source)
    out = tmp_path / "out"
    done = run_train(context, out, QLC_NPROC="2")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    predicate = manifest(out)["predicate"]
    assert predicate["status"] == "succeeded"
    assert predicate["run"]["world_size"] == 2
    effective = predicate["effective"]
    assert effective["distributed"] == "fsdp" and effective["optimizer"] == optimizer
    steps = [r for r in metrics(out) if r.get("event") == "train"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in steps)
    assert (out / contract.ADAPTER_DIR / "adapter_model.safetensors").is_file()
    assert (out / contract.CHECKPOINTS_DIR / "checkpoint-2").is_dir()
