"""The reference engine: trl's SFTTrainer (transformers' Trainer, peft, bitsandbytes) configured
from the plan. qlc computes the step count and warmup (the plan's rules) and the evaluation
loss (token-weighted, as the fast engine does) itself, so both engines mean the same by them."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.checkpoints import write_marker
from qlc.trainer.errors import Interrupted
from qlc.trainer.evaluate import token_weighted_loss
from qlc.trainer.observe import Observer, record_small_states
from qlc.trainer.types import (
    Decisions,
    Example,
    MetricsLog,
    StopFlag,
    TrainResult,
    peak_memory_bytes,
)


def training_args(plan: Plan, output_dir: Path, *, total_steps: int, use_cpu: bool,
                  world_size: int) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of trl's SFTConfig (transformers 5 names) for this plan."""
    s, e = plan.schedule, plan.engine
    p, o = e.precision, e.optimizer
    return {
        "output_dir": str(output_dir),
        "max_steps": total_steps,
        "per_device_train_batch_size": s.batch_size,
        "per_device_eval_batch_size": s.batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "learning_rate": o.learning_rate,
        "lr_scheduler_type": s.lr_scheduler,
        "warmup_steps": s.warmup_for(total_steps),
        "weight_decay": o.weight_decay,
        "optim": o.name,
        "max_grad_norm": o.max_grad_norm or 0.0,  # 0: the Trainer does not clip
        "train_sampling_strategy": "group_by_length" if s.group_by_length else "random",
        "activation_checkpointing": e.recompute == "every-layer",  # transformers 5.24 name
        "activation_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": p.adapter_compute == "bfloat16",
        "fp16": p.adapter_compute == "float16",
        "logging_steps": s.logging_steps,
        "eval_strategy": "no",  # qlc evaluates itself: one definition of eval_loss
        "save_strategy": "steps" if s.save_steps else "no",
        "save_steps": s.save_steps or 500,
        "save_total_limit": s.save_total_limit,
        "seed": plan.job.seed,
        "data_seed": plan.job.seed,
        "full_determinism": plan.job.deterministic,
        "max_length": plan.data.max_length,
        "packing": plan.data.packing,
        "use_cpu": use_cpu,
        "include_num_input_tokens_seen": "non_padding",
        "ddp_find_unused_parameters": False,
        **fsdp_args(plan, world_size),
        "report_to": "none",
        "disable_tqdm": True,
        "save_only_model": False,
    }


def fsdp_args(plan: Plan, world_size: int) -> dict[str, Any]:
    """FSDP sharding of the 4-bit model over the processes (storage dtype = compute dtype,
    checked by the spec)."""
    if not plan.engine.sharded(world_size):
        return {}
    return {  # transformers 5: fsdp is a flag, FSDP2 by default
        "fsdp": True,
        "fsdp_config": {
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "FULL_STATE_DICT",
        },
    }


def agreed_stop(stop: StopFlag) -> bool:
    """Whether every process stops after this step: any one of them was signalled (SIGTERM
    may reach one node of a job only, or the processes at different steps), so all save the
    same step's checkpoint and none waits in a collective the others left."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
        return stop.requested
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    flag = torch.tensor([int(stop.requested)], device=device)
    dist.all_reduce(flag)
    if flag.item() and not stop.requested:
        stop.signal_name = "SIGTERM"  # another process was signalled: stop as it does
    return bool(flag.item())


def callbacks(plan: Plan, plan_sha256: str, log: MetricsLog, stop: StopFlag,
              evaluate: Any, observer: Observer) -> Any:  # fmt: skip
    """The one callback that reports (metrics.jsonl), evaluates (token-weighted, at eval_steps),
    marks complete checkpoints and stops after a step when a stop was requested."""
    from transformers import TrainerCallback

    eval_steps = plan.schedule.eval_steps

    class Qlc(TrainerCallback):
        watching = contextlib.ExitStack()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.start, self.tokens_at_start = time.time(), state.num_input_tokens_seen

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            if not observer.watched:  # what the first step computes in, observed
                self.watching.enter_context(observer.watch())

        def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kw: Any) -> None:
            logs = logs or {}
            if "loss" not in logs:
                return
            seconds = max(time.time() - self.start, 1e-9)
            tokens = state.num_input_tokens_seen - self.tokens_at_start
            log({"event": "train", "step": state.global_step, "max_steps": state.max_steps,
                 "epoch": state.epoch, "loss": logs["loss"], "lr": logs.get("learning_rate"),
                 "grad_norm": logs.get("grad_norm"), "tokens_per_s": round(tokens / seconds, 1),
                 "memory_bytes": peak_memory_bytes()})  # fmt: skip

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.watching.close()
            if eval_steps and state.global_step % eval_steps == 0:
                value = evaluate(state.global_step)
                log({"event": "eval", "step": state.global_step, "eval_loss": value})
            if agreed_stop(stop):  # save this step's checkpoint, then stop
                control.should_save = True
                control.should_training_stop = True

        def on_save(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            import torch.distributed as dist

            if dist.is_available() and dist.is_initialized():
                dist.barrier()  # every process has written its part (rng_state_N.pth) first
            if state.is_world_process_zero:
                folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
                (folder / contract.MODEL_CARD_FILE).unlink(missing_ok=True)  # peft's empty card
                # trl's card of the checkpoints folder ("a fine-tuned version of [None]"):
                # the adapter's card, written at the end from the run's records, is the card.
                (Path(args.output_dir) / contract.MODEL_CARD_FILE).unlink(missing_ok=True)
                write_marker(folder, state.global_step, "reference", plan_sha256)

    return Qlc()


def train(
    *,
    model: Any,
    tokenizer: Any,
    train_examples: list[Example],
    eval_examples: list[Example],
    plan: Plan,
    plan_sha256: str,
    out: Path,
    log: MetricsLog,
    decisions: Decisions,
    stop: StopFlag,
    resume_from: Path | None,
    use_cpu: bool,
    world_size: int,
    observer: Observer,
) -> TrainResult:
    from datasets import Dataset, disable_progress_bars
    from transformers.trainer_callback import PrinterCallback
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    disable_progress_bars()  # dataset preparation bars: noise in run.log
    total = plan.schedule.total_steps(len(train_examples))
    args = SFTConfig(**training_args(plan, out / contract.CHECKPOINTS_DIR, total_steps=total,
                                     use_cpu=use_cpu, world_size=world_size))  # fmt: skip

    evaluated: dict[int, float | None] = {}  # step -> eval loss: the last step's is reused

    def evaluate(step: int) -> float | None:
        evaluated[step] = token_weighted_loss(model, eval_examples, plan, tokenizer.pad_token_id)
        return evaluated[step]

    trainer = SFTTrainer(
        model=model,
        args=args,
        processing_class=tokenizer,
        train_dataset=Dataset.from_list(list(train_examples)),
        callbacks=[callbacks(plan, plan_sha256, log, stop, evaluate, observer)],
    )
    trainer.remove_callback(PrinterCallback)  # metrics.jsonl and the progress line say it once
    packed: Any = trainer.train_dataset
    if plan.data.packing:  # trl packed the examples into fewer sequences: the steps follow
        total = plan.schedule.total_steps(len(packed))
        trainer.args.max_steps = total
        trainer.args.warmup_steps = plan.schedule.warmup_for(total)
        decisions.record("packed sequences", len(packed),
                         f"trl packed {len(train_examples)} examples; {total} steps")  # fmt: skip
    # trl 1.16 casts a quantized model's LoRA weights to bf16, but resuming reloads them in
    # float32: keep peft's float32 adapters (plan: adapter_weights float32).
    trained: Any = trainer.model
    record_small_states([p.numel() for p in trained.parameters() if p.requires_grad],
                        plan.engine.optimizer.state_bits, decisions)  # fmt: skip
    for param in trained.parameters():
        if param.requires_grad:
            param.data = param.data.float()
    started = time.time()
    if resume_from is not None and _finished(resume_from, total):
        # The Trainer would take one step past max_steps: load the final checkpoint instead.
        from transformers import TrainerState

        trainer._load_from_checkpoint(str(resume_from))
        trainer.state = TrainerState.load_from_json(str(resume_from / "trainer_state.json"))
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.time() - started
    if stop.requested:
        step = trainer.state.global_step
        raise Interrupted(stop.signal_name or "SIGTERM", checkpoint=f"checkpoint-{step}")
    trainer.save_model(str(out / contract.ADAPTER_STAGING_DIR))  # gathers under FSDP first
    if trainer.is_world_process_zero():  # a pickle of paths and flags, not part of the adapter
        (out / contract.ADAPTER_STAGING_DIR / "training_args.bin").unlink(missing_ok=True)
    step = trainer.state.global_step
    return TrainResult(
        steps=step,
        tokens_trained=int(trainer.state.num_input_tokens_seen),
        train_seconds=seconds,
        eval_loss=evaluated[step] if step in evaluated else evaluate(step),
        peak_memory_reserved=peak_memory_bytes(),
        observed=observer.after(trained, trainer.optimizer),
    )


def _finished(checkpoint: Path, total_steps: int) -> bool:
    """Whether a checkpoint is the run's last step (resuming it must train no more)."""
    import json

    state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
    return int(state.get("global_step", 0)) >= total_steps
