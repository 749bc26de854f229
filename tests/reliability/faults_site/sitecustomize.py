"""Fault injection for the reliability suite, loaded into the training process via PYTHONPATH.

Inert unless QLCTEST_FAULT is set (not a QLC_ name: the launcher hands the trainer none of
those but its own). When transformers' trainer module is imported it patches:
  QLCTEST_FAULT_STEP_DELAY=S         sleep S seconds in every training step (so a test can act
                                 between steps)
  QLCTEST_FAULT=raise-at:N           raise RuntimeError in step N (an exit-code failure)
  QLCTEST_FAULT=kill-in-save:N       SIGKILL itself halfway through writing checkpoint-N's
                                 optimizer.pt (a kill mid-checkpoint-write)
  QLCTEST_FAULT=fill-at:N            fill the output file system at step N (disk full from then on)
  QLCTEST_FAULT=fill-before-adapter  fill it just before the adapter is saved
  QLCTEST_FAULT=kill-in-adapter      SIGKILL itself halfway through writing the final adapter
Nothing here runs in qlc itself; it only stands in for the outside world going wrong.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

FAULT = os.environ.get("QLCTEST_FAULT", "")
ADAPTER_DIRS = ("adapter", ".adapter.partial")  # train.py saves to the second, then renames


def fill_disk(directory: str) -> None:
    """Write a filler file until the file system has no room left."""
    block = b"\0" * 65536
    with open(Path(directory) / "zz-filler", "ab") as handle:
        try:
            while True:
                handle.write(block)
                handle.flush()
        except OSError:
            pass
        try:
            while True:
                handle.write(b"\0")
                handle.flush()
        except OSError:
            pass


def install(trainer_module: Any) -> None:
    import torch

    kind, _, arg = FAULT.partition(":")
    delay = float(os.environ.get("QLCTEST_FAULT_STEP_DELAY", "0"))
    out = os.environ.get("QLC_OUTPUT_DIR", ".")
    original_step = trainer_module.Trainer.training_step

    def training_step(self: Any, *args: Any, **kwargs: Any) -> Any:
        step = self.state.global_step + 1
        if delay:
            time.sleep(delay)
        if kind == "raise-at" and step == int(arg):
            raise RuntimeError(f"injected failure at step {step}")
        if kind == "fill-at" and step == int(arg):
            fill_disk(out)
        return original_step(self, *args, **kwargs)

    trainer_module.Trainer.training_step = training_step
    original_save = torch.save

    def save(obj: Any, f: Any, *args: Any, **kwargs: Any) -> Any:
        name = str(f)
        if kind == "kill-in-save" and name.endswith(f"checkpoint-{arg}/optimizer.pt"):
            with open(name, "wb") as handle:
                handle.write(b"half of an optimizer state")
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        return original_save(obj, f, *args, **kwargs)

    torch.save = save
    if kind == "fill-before-adapter":
        import peft

        original_adapter_save = peft.PeftModel.save_pretrained

        def save_pretrained(self: Any, directory: Any, *args: Any, **kwargs: Any) -> Any:
            if Path(directory).name in ADAPTER_DIRS:
                fill_disk(out)
            return original_adapter_save(self, directory, *args, **kwargs)

        peft.PeftModel.save_pretrained = save_pretrained
    if kind == "kill-in-adapter":
        import peft.peft_model

        original_safe_save = peft.peft_model.safe_save_file

        def half_then_kill(tensors: Any, filename: str, *args: Any, **kwargs: Any) -> None:
            if Path(filename).parent.name not in ADAPTER_DIRS:
                return original_safe_save(tensors, filename, *args, **kwargs)
            with open(filename, "wb") as handle:
                handle.write(b"half an adapter")
                handle.flush()
                os.fsync(handle.fileno())
            os.kill(os.getpid(), signal.SIGKILL)

        peft.peft_model.safe_save_file = half_then_kill


class _TrainerHook(importlib.abc.MetaPathFinder):
    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "transformers.trainer":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        exec_module = loader.exec_module

        def exec_and_patch(module: Any) -> None:
            exec_module(module)
            install(module)

        loader.exec_module = exec_and_patch  # type: ignore[method-assign]
        return spec


if FAULT or os.environ.get("QLCTEST_FAULT_STEP_DELAY"):
    sys.meta_path.insert(0, _TrainerHook())
