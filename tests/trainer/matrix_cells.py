"""Runs matrix cells (compiled contexts) one after another in this process, each through its own
generated train.py's main() with the launch path's environment. Started plainly for one
process, or under torchrun for two (gloo): every process runs every cell, as torchrun would
have started train.py once per cell. The trainer is imported from the installed package first,
so every cell runs the same code (the contexts ship exactly these modules).

    python matrix_cells.py CELLS.json
"""

from __future__ import annotations

import json
import os
import runpy
import sys

import torch.distributed

import qlc.trainer.fast
import qlc.trainer.recipe
import qlc.trainer.reference  # noqa: F401  (imported before any context is on the path)
from qlc import contract


def main() -> int:
    with open(sys.argv[1], encoding="utf-8") as handle:
        cells = json.load(handle)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one group for every cell, ended here
        torch.distributed.init_process_group(backend="gloo")
    failures = 0
    for cell in cells:
        os.environ.update({
            contract.ENV_PLAN: cell["plan"],
            contract.ENV_OUTPUT_DIR: cell["out"],
            contract.ENV_MODEL_PATH: cell["model"],
            contract.ENV_DATA_PATH: cell["data"],
        })  # fmt: skip
        script = runpy.run_path(cell["script"], run_name="qlc_matrix_cell")
        code = script["main"]()
        failures += code != 0
        print(f"cell {cell['name']}: exit {code}", flush=True)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
