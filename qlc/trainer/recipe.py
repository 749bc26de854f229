"""The run, top to bottom, as the generated train.py calls it:

    run = Run.start(__file__, SETTINGS)   # plan, run directory, manifest; torchrun if several
    with run:                             # the outcome goes into the manifest, whatever happens
        data = run.prepare_data()         # rows -> rendered, tokenized examples (checked)
        model = run.load_model(data)      # the 4-bit base + LoRA as the plan says
        result = run.train(model, data)   # the plan's engine
        run.save(model, data, result)     # adapter, model card, sample, metrics

Everything it does follows the plan (plan.json beside train.py, or $QLC_PLAN); what the plan
leaves to the run (the world size, a kernel the GPU lacks, free memory) is applied by the plan's
own rules and recorded as a decision in the manifest.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

from qlc import contract
from qlc.compiler.plan import SMOKE_ROWS, TEMPLATE_KEY, Plan
from qlc.trainer import fetch, launch, provenance, track
from qlc.trainer.checkpoints import resumable
from qlc.trainer.errors import Interrupted, UserError
from qlc.trainer.examples import Prepared, prepare, prompt_ids, show_example
from qlc.trainer.model import ModelSource, build_smoke_model, load_tokenizer, model_source
from qlc.trainer.observe import Observer
from qlc.trainer.render import check_sources
from qlc.trainer.rows import SourceRows, load_rows
from qlc.trainer.runenv import RunEnv
from qlc.trainer.types import (
    Decisions,
    MetricsLog,
    SampleRequest,
    StopFlag,
    TrainResult,
    peak_memory_bytes,
)

SAMPLE_NEW_TOKENS = 48
SMOKE_SAMPLE_TOKENS = 16


def read_plan(script: str, environ: dict[str, str]) -> tuple[Plan, bytes]:
    path = Path(
        environ.get(contract.ENV_PLAN) or Path(script).resolve().parent / contract.PLAN_FILE
    )
    try:
        data = path.read_bytes()
    except OSError as error:
        raise UserError(f"cannot read the plan {path}: {error.strerror}") from None
    try:
        return Plan.model_validate_json(data), data
    except ValueError as error:
        raise UserError(
            f"{path} is not a plan this trainer reads ({str(error).splitlines()[0]}): "
            "recompile the spec with this qlc"
        ) from None


def check_settings(plan: Plan, settings: dict[str, Any]) -> None:
    """train.py's literals must be the plan's: train.py is generated, plan.json is what runs."""
    expected = {row.name: row.value for row in plan.settings()}
    wrong = [name for name in sorted(set(expected) | set(settings))
             if json.dumps(settings.get(name)) != json.dumps(expected.get(name))]  # fmt: skip
    if wrong:
        name = wrong[0]
        raise UserError(
            f"train.py says {name} = {json.dumps(settings.get(name))} but plan.json says "
            f"{json.dumps(expected.get(name))} ({len(wrong)} setting(s) differ): train.py is "
            "generated from the plan; change the spec and recompile instead of editing it"
        )


def settings_text(plan: Plan) -> str:
    rows = plan.settings()
    width = max(len(row.name) for row in rows)
    lines = [f"{row.name:<{width}}  {json.dumps(row.value)}  ({row.source})" for row in rows]
    lines += [f"substitution: {s.key}: {json.dumps(s.written)} -> {json.dumps(s.effective)} "
              f"({s.why})" for s in plan.substitutions]  # fmt: skip
    return "\n".join(lines) + "\n"


@dataclass
class Data:
    train: Prepared
    eval: Prepared | None
    tokenizer: Any
    source: ModelSource
    local_data: str | None
    sources: list[SourceRows] = field(default_factory=list)  # a mixture's

    @property
    def held_out_prompt(self) -> str:
        kept = self.eval.rendered if self.eval is not None else self.train.rendered
        return (kept[0] if self.eval is not None else kept[-1]).prompt


@dataclass
class Run:
    plan: Plan  # the plan that runs: smoke and world-size variants applied
    plan_sha256: str
    env: RunEnv
    manifest: dict[str, Any]
    launched: bool = False
    code: int = contract.EXIT_FAILED
    use_cpu: bool = True
    decisions: Decisions = field(default_factory=Decisions)
    stop: StopFlag = field(default_factory=StopFlag)
    training: bool = False
    owns_group: bool = False  # the process group this run made (and ends)
    log: MetricsLog | None = None
    trackers: track.Trackers | None = None  # rank 0's experiment trackers

    @classmethod
    def start(cls, script: str, settings: dict[str, Any]) -> Run:
        environ = dict(os.environ)
        env = RunEnv.read(environ)
        try:
            plan, plan_bytes = read_plan(script, environ)
            check_settings(plan, settings)
        except UserError as error:
            print(f"error: {error}", file=sys.stderr, flush=True)
            raise SystemExit(contract.EXIT_USER_ERROR) from None
        plan_sha = contract.sha256_bytes(plan_bytes)
        lock = Path(script).resolve().parent / contract.LOCK_FILE
        lock_sha = contract.sha256_file(lock) if lock.is_file() else (
            plan.lock.sha256 if plan.lock else None)  # fmt: skip
        run = cls(plan.for_smoke() if env.smoke else plan, plan_sha, env,
                  provenance.new_manifest(plan, plan_sha, lock_sha, env))  # fmt: skip
        run.decisions.echo = run.say
        run.begin(script, plan_bytes)
        return run

    def say(self, line: str) -> None:
        if self.env.writes:
            print(line, flush=True)

    def begin(self, script: str, plan_bytes: bytes) -> None:
        out, env = self.env.output_dir, self.env
        if env.writes:  # rank 0, also under a launcher that is not qlc's (a job's torchrun)
            problem = claim(out, self.plan_sha256, self.plan.job.name, env.run_id)
            if problem is not None:
                print(f"error: {problem}", file=sys.stderr, flush=True)
                flag_user_error(problem)
                raise SystemExit(contract.EXIT_USER_ERROR)
            (out / contract.PREEMPTED_FLAG).unlink(missing_ok=True)
        narrowed = launch.narrow_visible_gpus(self.plan)
        if narrowed is not None:
            self.decisions.record("visible GPUs", narrowed, "runtime.gpus of this host's GPUs")
        if env.writes:
            provenance.write_manifest(out, self.manifest)
            contract.write_bytes_atomic(out / contract.PLAN_FILE, plan_bytes)
            contract.write_bytes_atomic(
                out / contract.SETTINGS_FILE, settings_text(self.plan).encode()
            )
            self.say("qlc settings:\n" + settings_text(self.plan).rstrip())
        signal.signal(signal.SIGTERM, self.on_signal)
        signal.signal(signal.SIGINT, self.on_signal)
        import torch

        try:
            argv = launch.launch_argv(self.plan, os.environ, torch.cuda.device_count(), script)
        except UserError as error:  # GPUs or processes this host does not have
            self.__exit__(UserError, error, None)  # printed, and recorded in the manifest
            raise SystemExit(contract.EXIT_USER_ERROR) from None
        if argv is not None:
            flag = out / contract.USER_ERROR_FLAG
            flag.unlink(missing_ok=True)
            code = launch.supervise_launch(
                argv, {**os.environ, contract.ENV_USER_ERROR_FILE: str(flag)}
            )
            if code != 0 and flag.is_file():  # rank 0 stopped on a user error (printed)
                flag.unlink()
                code = contract.EXIT_USER_ERROR
            self.launched, self.code = True, code

    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.training and not self.stop.requested:
            self.stop.signal_name = name  # the engine saves a checkpoint after this step
            self.say(f"qlc: {name}: stopping after this step, with a checkpoint")
            return
        raise Interrupted(name)

    # -- the steps train.py calls
    def prepare_data(self) -> Data:
        plan, env = self.plan, self.env
        self.use_cpu = launch.uses_cpu(plan, env)
        self.owns_group = launch.init_distributed(env, self.use_cpu)
        self.scale_to_world()
        self.manifest["predicate"]["environment"]["rank_devices"] = devices = launch.rank_devices(
            env, self.use_cpu
        )
        if env.world_size > 1 and not self.use_cpu:
            self.manifest["predicate"]["environment"]["gpus"] = devices
        if env.writes:
            shutil.rmtree(env.output_dir / contract.ADAPTER_STAGING_DIR, ignore_errors=True)
        # The data first: a file that cannot be read stops the run before the training stack
        # (transformers, peft) is even imported. Reading rows draws from no global generator.
        fetched = self.fetch_inputs()
        data_path = fetched.data_file or env.data_path
        fetch.check_local_pins(plan, data_path, None)
        rows = load_rows(plan, data_path, SMOKE_ROWS if env.smoke else None, env.input_paths)
        check_sources(rows, plan.data)
        seed_everything(plan.job.seed, plan.job.deterministic)
        if env.smoke:
            source = self.smoke_model(rows.train)
        else:
            source = model_source(plan.model, fetched.model_dir or env.model_path)
            fetch.check_local_pins(plan, None, source.path_or_id if source.local else None)
        tokenizer = load_tokenizer(plan, source, env.input_paths)
        train = prepare(rows.train, plan.data, tokenizer, rows.source, "train", rows.train_numbers)
        held = (
            prepare(rows.eval, plan.data, tokenizer, rows.source, "eval", rows.eval_numbers)
            if rows.eval
            else None
        )
        if env.writes:
            report = {"train": train.report, "eval": held.report if held else None}
            contract.write_json_atomic(env.output_dir / contract.DATA_REPORT_FILE, report)
            self.say("data: " + json.dumps(train.report))
            self.say(show_example(train.rendered[0], train.examples[0], tokenizer))
        return Data(train, held, tokenizer, source, rows.local_file, rows.sources)

    def fetch_inputs(self) -> fetch.Fetched:
        """Object-store inputs into the run directory: rank 0 downloads (the run directory is
        shared by every node), the others read what it fetched."""
        fetched = None
        if self.env.writes and self.plan.object_stores:
            fetched = fetch.fetch_inputs(self.plan, self.env.output_dir, model=not self.env.smoke)
        found = launch.broadcast(fetched, self.env)
        return found if isinstance(found, fetch.Fetched) else fetch.Fetched(None, None)

    def scale_to_world(self) -> None:
        """The plan's schedule for the processes that actually train (its own rule)."""
        world = self.env.world_size
        try:
            schedule = self.plan.schedule.for_world(world)
        except ValueError as error:
            raise UserError(str(error)) from None
        if schedule != self.plan.schedule:
            self.decisions.record(
                "world size", world,
                f"{world} processes: grad_accum {schedule.grad_accum}, "
                f"{schedule.examples_per_step} examples per step",
            )  # fmt: skip
            train = self.plan.train.model_copy(update={"schedule": schedule})
            self.plan = self.plan.model_copy(update={"train": train})
        provenance.record_plan(self.manifest, self.plan)

    def smoke_model(self, rows: list[dict[str, Any]]) -> ModelSource:
        """Rank 0 builds the smoke model; the other processes wait and read it."""
        folder = self.env.output_dir / contract.SMOKE_MODEL_DIR
        if self.env.writes:
            build_smoke_model(self.plan, rows, folder)
        launch.barrier(self.env)
        return ModelSource(str(folder), None, local=True)

    def load_model(self, data: Data) -> Any:
        from qlc.trainer.model import load_model

        model = load_model(self.plan, data.source, self.use_cpu, self.env.local_rank,
                           self.env.world_size)  # fmt: skip
        self.record_inputs(data)
        return model

    def record_inputs(self, data: Data) -> None:
        plan, source = self.plan, data.source
        model_id = None if self.env.smoke else plan.model.hub_id
        model_uri = None if self.env.smoke else plan.model.uri
        self.manifest["predicate"]["inputs"] = {
            "model": provenance.input_record(
                model_id, source.revision, source.path_or_id if source.local else None, "model",
                uri=model_uri,
            ),
            "data": provenance.mixture_record(data.sources) if data.sources else
            provenance.input_record(plan.data.hub_id, plan.data.revision, data.local_data,
                                    "dataset", uri=plan.data.uri),
        }  # fmt: skip
        if plan.data.chat_template_file is not None:
            path = self.env.input_paths.get(TEMPLATE_KEY) or plan.data.chat_template_file
            inputs = self.manifest["predicate"]["inputs"]
            inputs["chat_template"] = provenance.input_record(None, None, path, "file")

    def train(self, model: Any, data: Data) -> TrainResult:
        env, plan = self.env, self.plan
        self.log = MetricsLog(env.output_dir / contract.METRICS_FILE, env.writes)
        if env.writes:
            self.start_trackers(self.log)
        checkpoints = env.output_dir / contract.CHECKPOINTS_DIR
        chosen = (
            resumable(checkpoints, self.effective_sha256(), plan.engine.name)
            if env.writes
            else None
        )
        resume = launch.broadcast(str(chosen) if chosen else None, env)
        resume_from = Path(resume) if resume else None
        self.manifest["predicate"]["run"]["resumed_from"] = (
            resume_from.name if resume_from else None
        )
        if resume_from is not None:
            self.log({"event": "resume", "checkpoint": resume_from.name})
            self.say(f"qlc: resuming from {resume_from.name} (same plan)")
        evals = data.eval.examples if data.eval else []
        config = model.get_base_model().config
        observer = Observer(plan.lora.r, int(config.vocab_size))
        self.training = True
        try:
            if plan.engine.name == "fast":
                result = self.train_fast(model, data, evals, resume_from, observer)
            else:
                result = self.train_reference(model, data, evals, resume_from, observer)
            self.manifest["predicate"]["observed"] = result.observed
            return result
        finally:
            self.training = False

    def start_trackers(self, log: MetricsLog) -> None:
        """TensorBoard, W&B, MLflow as the plan says: they get every record the log writes;
        where each one logs goes into the manifest at once."""
        settings = provenance.effective_settings(self.plan)
        self.trackers = track.start(self.plan, self.env.output_dir, self.env.run_id, settings)
        log.listeners.append(self.trackers)
        self.manifest["predicate"]["tracking"] = self.trackers.entries
        provenance.write_manifest(self.env.output_dir, self.manifest)
        for entry in self.trackers.entries:
            where = entry.get("url") or entry.get("log_dir")
            if where and entry["error"] is None:
                self.say(f"qlc: tracking: {entry['tracker']}: {where}")

    def train_reference(self, model: Any, data: Data, evals: list[Any],
                        resume_from: Path | None, observer: Observer) -> TrainResult:  # fmt: skip
        from qlc.trainer import reference

        env, plan = self.env, self.plan
        assert self.log is not None
        return reference.train(
            model=model, tokenizer=data.tokenizer, train_examples=data.train.examples,
            eval_examples=evals, plan=plan, plan_sha256=self.effective_sha256(),
            out=env.output_dir, log=self.log, decisions=self.decisions, stop=self.stop,
            resume_from=resume_from, use_cpu=self.use_cpu, world_size=env.world_size,
            observer=observer,
        )  # fmt: skip

    def train_fast(self, model: Any, data: Data, evals: list[Any],
                   resume_from: Path | None, observer: Observer) -> TrainResult:  # fmt: skip
        from qlc.trainer import fast

        assert self.log is not None
        tokenizer = data.tokenizer
        sample = SampleRequest(prompt_ids(tokenizer, data.held_out_prompt), self.sample_tokens(),
                               tokenizer.eos_token_id) if self.env.writes else None  # fmt: skip
        result = fast.train(
            model=model, pad_id=tokenizer.pad_token_id or 0, train_examples=data.train.examples,
            eval_examples=evals, plan=self.plan, plan_sha256=self.effective_sha256(),
            out=self.env.output_dir, log=self.log, decisions=self.decisions, stop=self.stop,
            resume_from=resume_from, sample=sample, observer=observer,
        )  # fmt: skip
        if self.env.writes:  # every process holds the same adapter
            model.save_pretrained(self.env.output_dir / contract.ADAPTER_STAGING_DIR)
        return result

    def effective_sha256(self) -> str:
        """The hash of the plan that runs (smoke and world size applied): checkpoints carry it."""
        return contract.sha256_bytes(self.plan.model_dump_json().encode())

    def sample_tokens(self) -> int:
        return SMOKE_SAMPLE_TOKENS if self.env.smoke else SAMPLE_NEW_TOKENS

    def save(self, model: Any, data: Data, result: TrainResult) -> None:
        if not self.env.writes:  # rank 0 writes the records; this process's part is done
            self.code = contract.EXIT_OK
            return
        out = self.env.output_dir
        data.tokenizer.save_pretrained(out / contract.ADAPTER_STAGING_DIR)
        publish_adapter(out)
        self.write_sample(model, data, result)
        assert self.log is not None
        metrics = {
            "steps": result.steps,
            "tokens_trained": result.tokens_trained,
            "train_seconds": round(result.train_seconds, 3),
            "tokens_per_s": round(result.tokens_per_s, 1),
            "eval_loss": result.eval_loss,
            "final_loss": self.log.final_loss(),
            "peak_memory_bytes": peak_memory_bytes(),  # the whole process: load, train, sample
            "peak_memory_reserved": result.peak_memory_reserved,  # training
            "peak_memory_allocated": result.peak_memory_allocated,
            "time_to_first_step_s": result.time_to_first_step_s,
        }
        self.manifest["predicate"]["metrics"] = metrics
        self.log({"event": "summary", **metrics})
        from qlc.trainer.model_card import write_model_card

        self.manifest["predicate"]["status"] = "succeeded"
        write_model_card(out, self.plan, self.manifest)
        self.code = contract.EXIT_OK

    def write_sample(self, model: Any, data: Data, result: TrainResult) -> None:
        """sample.json: the held-out prompt's greedy continuation."""
        from qlc.trainer.sample import generate_sample

        prompt, new_tokens = data.held_out_prompt, self.sample_tokens()
        sample: dict[str, Any] = {"prompt": prompt, "held_out": data.eval is not None,
                                  "max_new_tokens": new_tokens}  # fmt: skip
        if self.plan.engine.sharded(self.env.world_size):
            sample["skipped"] = "FSDP shards the model across processes"
        elif result.sample_ids is not None:  # computed by the engine (the streamed setting)
            sample["completion"] = data.tokenizer.decode(
                result.sample_ids, skip_special_tokens=True
            )
        else:
            sample["completion"] = generate_sample(model, data.tokenizer, prompt, new_tokens)
        contract.write_json_atomic(self.env.output_dir / contract.SAMPLE_FILE, sample)

    # -- the outcome
    def __enter__(self) -> Run:
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 tb: TracebackType | None) -> bool:  # fmt: skip
        status, message, handled = "failed", None, True
        if error is None:
            status = "succeeded" if self.code == contract.EXIT_OK else "failed"
        elif isinstance(error, Interrupted):
            status, message = "interrupted", self.interrupted(error)
        elif isinstance(error, UserError):
            message, self.code = str(error), contract.EXIT_USER_ERROR
            print(f"error: {error}", file=sys.stderr, flush=True)
            if self.env.writes:
                flag_user_error(message)
        else:
            message, handled = f"{type(error).__name__}: {error}", False
        self.decisions.echo = None
        if self.trackers is not None:  # never raises: a tracker that fails is recorded
            self.trackers.finish(status)
        self.manifest["predicate"]["decisions"] = self.decisions.entries
        if self.env.writes and not self.launched:
            provenance.finish_manifest(self.manifest, self.env.output_dir, status, message)
            provenance.write_manifest(self.env.output_dir, self.manifest)
        if self.owns_group:
            launch.finish_distributed()
        return handled

    def interrupted(self, error: Interrupted) -> str:
        signum = signal.Signals[error.signal_name]
        if error.checkpoint is not None:
            self.code = contract.EXIT_PREEMPTED
            # Every process that stopped so says it where its node's script looks (torchrun
            # exits 1 whatever ended its processes): the node exits 143, which is retried.
            with contextlib.suppress(OSError):
                (self.env.output_dir / contract.PREEMPTED_FLAG).touch()
            return (
                f"stopped by {error.signal_name}; {error.checkpoint} saved: the run resumes from it"
            )
        self.code = 128 + int(signum)
        return f"stopped by {error.signal_name}"


def claim(out: Path, plan_sha256: str, job: str, run_id: str | None) -> str | None:
    """The run directory claimed for this plan, or why not (one the process cannot write
    too: an output volume the job's user may not write is the user's to fix)."""
    try:
        return contract.claim_run_dir(out, plan_sha256, job, run_id)
    except OSError as error:
        return (
            f"cannot create the run directory {out}: {error.strerror or error} (as uid "
            f"{os.getuid()}, gid {os.getgid()}): the output location must let this user "
            "create, write and rename files (its owner, or a group it is in)"
        )


def flag_user_error(message: str) -> None:
    """Tell the launcher (qlc's, or a job's node script) that the run stopped on a user error."""
    flag = os.environ.get(contract.ENV_USER_ERROR_FILE)
    if flag:
        with contextlib.suppress(OSError):
            Path(flag).write_text(message + "\n")


def seed_everything(seed: int, deterministic: bool) -> None:
    from transformers import enable_full_determinism, set_seed

    if deterministic:
        enable_full_determinism(seed)
    else:
        set_seed(seed)


def sort_target_modules(config_path: Path) -> None:
    """peft writes target_modules from a set, in an order that varies with the hash seed:
    sort it so the same training gives the same adapter_config.json bytes."""
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def publish_adapter(out: Path) -> None:
    """Swap the complete new adapter in by renames: a finished adapter is never half-written,
    and a rerun that dies while saving leaves the previous one as it was."""
    staging = out / contract.ADAPTER_STAGING_DIR
    final, old = out / contract.ADAPTER_DIR, out / contract.ADAPTER_OLD_DIR
    sort_target_modules(staging / "adapter_config.json")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(staging, final)
    shutil.rmtree(old, ignore_errors=True)
