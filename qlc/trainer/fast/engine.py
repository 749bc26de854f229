"""train(): the fast engine executing a plan (plan.train.engine), and deciding nothing the plan
holds. What only the run can know (the path a loaded model allows, the attention kernel, free
GPU memory) follows the plan's rule and is recorded through `decisions`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, cast

import torch

from qlc.compiler.plan import Plan
from qlc.contract import ENV_PROFILE_STEPS
from qlc.trainer.errors import UserError
from qlc.trainer.fast.checkpoint import TrainingState, load_checkpoint, read_marker
from qlc.trainer.fast.decoder import DecoderSetup, FastDecoder
from qlc.trainer.fast.generic import GenericLoss
from qlc.trainer.fast.kernels import Attention
from qlc.trainer.fast.loop import Loop, LossFn, evaluate
from qlc.trainer.fast.loss import head_matmul
from qlc.trainer.fast.optimizer import make_optimizer
from qlc.trainer.fast.path import decide_recompute, use_decoder
from qlc.trainer.fast.precision import Dtypes, LossScaler
from qlc.trainer.fast.ranks import Ranks
from qlc.trainer.fast.schedule import pack, step_schedule
from qlc.trainer.observe import Observer
from qlc.trainer.types import (
    Decisions,
    Example,
    MetricsLog,
    SampleRequest,
    StopFlag,
    TrainResult,
)


class FastLoss:
    """The padding-free decoder's loss, with the adapter's compute-dtype copies kept current."""

    def __init__(self, decoder: FastDecoder) -> None:
        self.decoder, self.loras = decoder, decoder.loras

    def loss_sum(self, examples: list[Example], device: torch.device) -> torch.Tensor:
        return self.decoder.loss_sum(pack(examples, device))

    def train(self, flag: bool) -> None:
        self.decoder.training = flag

    def after_backward(self) -> None:
        for lora in self.loras:
            lora.hand_back_grads()

    def after_step(self) -> None:
        for lora in self.loras:
            lora.refresh()


def train(
    *,
    model: torch.nn.Module,
    pad_id: int,
    train_examples: list[Example],
    eval_examples: list[Example],
    plan: Plan,
    plan_sha256: str,
    out: Path,
    log: MetricsLog,
    decisions: Decisions,
    stop: StopFlag,
    resume_from: Path | None,
    sample: SampleRequest | None,
    observer: Observer | None = None,
) -> TrainResult:
    """Train the peft model's adapter in place as `plan` says (plan.train.schedule already sized
    for this world). Checkpoints go to out/checkpoints; a stop request saves one and raises
    Interrupted. `sample` with streamed base weights: the greedy continuation is computed
    before the weights go back to host memory (TrainResult.sample_ids)."""
    started = time.perf_counter()
    ranks, device = _ranks(plan), _device(model, plan)
    if device.type == "cuda" and plan.engine.base_weights != "dequantized":
        torch.cuda.memory._set_allocator_settings("expandable_segments:True")  # less waste
    torch.manual_seed(plan.job.seed)  # dropout; a resumed run restores its saved state
    steps = step_schedule([len(ex["input_ids"]) for ex in train_examples], plan.schedule,
                          plan.job.seed)  # fmt: skip
    was_training, peft_model = model.training, cast(Any, model)
    decoder, loss_fn = _loss(peft_model, pad_id, plan, device, train_examples, decisions)
    try:
        loop = Loop(
            plan=plan,
            loss_fn=loss_fn,
            state=_training_state(peft_model, plan, device, len(steps), decisions),
            steps=steps,
            examples=train_examples,
            eval_examples=eval_examples,
            device=device,
            ranks=ranks,
            log=log,
            stop=stop,
            out=out,
            plan_sha256=plan_sha256,
            profile_steps=_profile_steps(decisions),
            started=started,
            observer=observer,
        )
        return _run(loop, decoder, resume_from, sample, decisions)
    finally:
        _release(decoder, loss_fn)
        model.train(was_training)


def _run(
    loop: Loop,
    decoder: FastDecoder | None,
    resume_from: Path | None,
    sample: SampleRequest | None,
    decisions: Decisions,
) -> TrainResult:
    """Resume, train, evaluate, sample: the engine's work once everything is in place."""
    if resume_from is not None:
        loop.step = read_marker(resume_from, loop.plan_sha256)
        load_checkpoint(resume_from, loop.state, loop.ranks.rank, loop.ranks.world, decisions)
    loop.loss_fn.after_step()  # the adapter's compute copies, of the (restored) weights
    loop.run()
    seconds = time.perf_counter() - loop.started
    batch_size = loop.plan.schedule.batch_size
    eval_loss = evaluate(loop.loss_fn, loop.eval_examples, batch_size, loop.device)
    sample_ids = None
    if sample is not None and decoder is not None and decoder.stream is not None:
        sample_ids = decoder.greedy(sample.prompt_ids, sample.new_tokens, sample.stop_id)
    cuda = loop.device.type == "cuda"
    return TrainResult(
        steps=loop.step,
        tokens_trained=loop.tokens,
        train_seconds=seconds,
        eval_loss=eval_loss,
        peak_memory_allocated=torch.cuda.max_memory_allocated(loop.device) if cuda else None,
        peak_memory_reserved=torch.cuda.max_memory_reserved(loop.device) if cuda else None,
        time_to_first_step_s=loop.first_step_s,
        sample_ids=sample_ids,
        observed=loop.observer.after(loop.state.model, loop.state.optimizer)
        if loop.observer
        else {},
    )


def _ranks(plan: Plan) -> Ranks:
    ranks = Ranks.current()
    if plan.schedule.world_size != ranks.world:
        raise ValueError(
            f"the plan's schedule is sized for {plan.schedule.world_size} processes, this run "
            f"has {ranks.world}: pass plan.schedule.for_world({ranks.world})"
        )
    return ranks


def _device(model: torch.nn.Module, plan: Plan) -> torch.device:
    """Where training computes: streamed, the current GPU (the model sits in host memory);
    otherwise where the model is."""
    if plan.engine.base_weights == "streamed" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return next(p.device for p in model.parameters())


def _loss(
    model: Any,
    pad_id: int,
    plan: Plan,
    device: torch.device,
    examples: list[Example],
    decisions: Decisions,
) -> tuple[FastDecoder | None, LossFn]:
    """The padding-free decoder's loss, or the generic path's (recorded)."""
    dtypes = Dtypes.of(plan.engine.precision)
    if use_decoder(model, plan, examples, decisions):
        attention, why = Attention.for_device(device, dtypes.activations)
        decisions.record("train.engine.attention", attention.name, why)
        matmul, how = head_matmul(device, dtypes.base)
        decisions.record("train.engine.precision.logits", "float32", how)
        if matmul is None and plan.engine.loss == "full":  # same values, less memory
            why = "the fused cross-entropy runs by chunks on this GPU (float32 logits, none kept)"
            decisions.record("train.engine.loss", "chunked", why)
        setup = DecoderSetup(
            device=device,
            dtypes=dtypes,
            base_weights=plan.engine.base_weights,
            chunked_loss=plan.engine.loss == "chunked",
            attention=attention,
            head_matmul=matmul,
        )
        decoder = FastDecoder(model, setup)
        decoder.recompute = decide_recompute(model, plan, examples, device, decisions)
        return decoder, FastLoss(decoder)
    _record_generic(plan, decisions)
    if plan.engine.base_weights == "streamed":
        model.to(device)  # the generic path computes where the model is
    recompute = decide_recompute(model, plan, examples, device, decisions)
    return None, GenericLoss(model, pad_id, dtypes, recompute, decisions)


def _record_generic(plan: Plan, decisions: Decisions) -> None:
    """What the generic path cannot do the padding-free decoder's way (a fallback at run time,
    or a plan that asked for it)."""
    engine = plan.engine
    if engine.base_weights != "4bit":
        decisions.record(
            "train.engine.base_weights",
            "4bit",
            "the generic path runs the model's own 4-bit layers (bitsandbytes dequantizes per "
            f"matmul); {engine.base_weights!r} needs the padding-free decoder",
        )
    if engine.loss == "chunked":
        decisions.record(
            "train.engine.loss",
            "full",
            "the generic path's forward is the model's own: it computes the whole logits",
        )


def _profile_steps(decisions: Decisions) -> int:
    text = os.environ.get(ENV_PROFILE_STEPS, "").strip()
    if not text:
        return 0
    if not text.isdigit():
        raise UserError(f"{ENV_PROFILE_STEPS} = {text!r}: a number of steps (or unset)")
    decisions.record(
        "profile_steps",
        int(text),
        f"{ENV_PROFILE_STEPS}: a torch.profiler table of these steps (no numerics change)",
    )
    return int(text)


def _training_state(
    model: Any, plan: Plan, device: torch.device, total: int, decisions: Decisions
) -> TrainingState:
    from transformers import get_scheduler

    optimizer = make_optimizer(model, plan.engine.optimizer, device, decisions)
    scheduler = get_scheduler(
        plan.schedule.lr_scheduler,
        optimizer,
        num_warmup_steps=plan.schedule.warmup_for(total),
        num_training_steps=total,
    )
    scaler = LossScaler(plan.engine.precision.loss_scaling, device)
    return TrainingState(model, optimizer, scheduler, scaler)


def _release(decoder: FastDecoder | None, loss_fn: LossFn) -> None:
    if decoder is not None:
        decoder.release()
    if isinstance(loss_fn, GenericLoss):
        loss_fn.release()
