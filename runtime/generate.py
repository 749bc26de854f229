"""Generate with a run's adapter: verified inputs, prompts rendered exactly as training did.

`open_run` checks everything a later step would otherwise trust: the manifest says the run
succeeded, every adapter file matches its sha256 in the manifest's subjects, the plan matches
the manifest's plan_sha256, and the base model is the one training saw (local files with the
recorded sha256 each, or the hub id at the recorded revision).

Prompts go through the trainer's own code (qlc.trainer: the render functions of text /
instruction template / chat template, the 4-bit loading, the token rule: special tokens added,
a doubled BOS dropped), so a prompt becomes the tokens a training example started with.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.contract import ADAPTER_FILES, sha256_file
from qlc.contract import MANIFEST_FILE as MANIFEST
from qlc.contract import PLAN_FILE as PLAN
from qlc.userio import UnreadableFile, is_dir, is_file, read_user_file

DOC_FILES = ("README.md", "loss.svg")  # may be written after the manifest hashed the adapter
STATE_CONTEXTS = Path(".qlc") / "contexts"
MAX_MANIFEST_BYTES = 64 << 20


class RunInputError(Exception):
    """A run directory, manifest or base model that cannot be trusted or used (a user error)."""


@dataclass(frozen=True)
class BaseModelRef:
    source: str  # local directory or hub id
    revision: str | None
    local: bool


@dataclass(frozen=True)
class RunInputs:
    run_dir: Path
    manifest: dict[str, Any]
    manifest_sha256: str
    plan: Plan  # the plan that ran (its smoke variant for a smoke run)
    adapter_dir: Path
    base: BaseModelRef


def hash_dir(root: Path) -> dict[str, str]:
    """{relative path: sha256} of every file, as the trainer records a model."""
    return contract.hash_tree(root)


def read_manifest(run: Path) -> tuple[Path, dict[str, Any], str]:
    path = run if run.suffix == ".json" else run / MANIFEST
    if not is_file(path):
        raise RunInputError(f"{path}: no manifest; pass a run directory or its manifest.json")
    try:
        data = read_user_file(path, MAX_MANIFEST_BYTES)
    except UnreadableFile as error:
        raise RunInputError(f"{path}: cannot read the manifest: {error.reason}") from None
    try:
        manifest = json.loads(data)
        predicate = manifest["predicate"]
    except (ValueError, KeyError, TypeError):
        raise RunInputError(
            f"{path}: not a qlc manifest (unreadable JSON or no predicate)"
        ) from None
    if predicate.get("status") != "succeeded":
        raise RunInputError(
            f"{path}: the run's status is {predicate.get('status')!r}, not 'succeeded': "
            "it has no final adapter to use"
        )
    return path.parent, manifest, hashlib.sha256(data).hexdigest()


def verify_adapter(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """The adapter directory, once every file matches the manifest's subjects."""
    adapter = run_dir / "adapter"
    missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
    if missing:
        raise RunInputError(f"{adapter}: no adapter here ({', '.join(missing)} missing)")
    subjects = {s["name"]: s["digest"]["sha256"] for s in manifest.get("subject", [])}
    for name in ADAPTER_FILES:
        if f"adapter/{name}" not in subjects:
            raise RunInputError(f"{run_dir / MANIFEST}: its subjects do not list adapter/{name}")
    for name, expected in subjects.items():
        path = run_dir / name
        if not path.is_file():
            raise RunInputError(f"{path}: listed in the manifest but missing")
        if sha256_file(path) != expected:
            raise RunInputError(
                f"{path}: sha256 differs from the manifest's subject: the adapter was "
                "changed after the run (or the manifest belongs to another run)"
            )
    for path in sorted(adapter.rglob("*")):
        name = path.relative_to(run_dir).as_posix()
        if path.is_file() and name not in subjects and path.name not in DOC_FILES:
            raise RunInputError(f"{path}: not in the manifest's subjects; remove it")
    return adapter


def recorded_spec(manifest: dict[str, Any]) -> Path | None:
    """The spec file the runtime recorded for this run (host.spec_path), if it is still there."""
    spec_path = (manifest["predicate"].get("host") or {}).get("spec_path")
    return Path(spec_path) if spec_path and Path(spec_path).is_file() else None


def compiled_plan(spec_path: Path, spec_name: str) -> bytes | None:
    """plan.json as `qlc compile` makes it from the spec (and its lock) as they are now."""
    from qlc.compiler.context import compile_spec
    from qlc.compiler.load import SpecError, read_spec_and_lock

    try:
        source, lock = read_spec_and_lock(spec_path)
        context = compile_spec(source, spec_name, lock)
    except SpecError:
        return None
    plan: bytes | None = context.files.get(PLAN)
    return plan


def find_plan(run_dir: Path, manifest: dict[str, Any]) -> Plan:
    """The run's plan, by its sha256: beside the run, in this project's build contexts, or
    compiled again from the recorded spec (a plan is a pure function of spec and lock); the
    smoke variant for a smoke run."""
    expected = manifest["predicate"].get("plan_sha256") or ""
    smoke = bool((manifest["predicate"].get("run") or {}).get("smoke"))
    for path in [run_dir / PLAN, *sorted(STATE_CONTEXTS.glob(f"*/{PLAN}"))]:
        if path.is_file() and sha256_file(path) == expected:
            return _plan(path.read_bytes(), smoke, path)
    spec_path = recorded_spec(manifest)
    spec_name = (manifest["predicate"].get("spec") or {}).get("name") or ""
    compiled = compiled_plan(spec_path, spec_name) if spec_path else None
    if compiled is not None and hashlib.sha256(compiled).hexdigest() == expected:
        return _plan(compiled, smoke, spec_path or run_dir)
    raise RunInputError(
        f"{run_dir}: no plan with the manifest's plan_sha256 {expected[:12]}... (looked in "
        f"{run_dir / PLAN}, {STATE_CONTEXTS}/*/ and the recorded spec "
        f"{spec_path or 'none'}): copy the run's build context's plan.json into the run directory"
    )


def _plan(data: bytes, smoke: bool, where: Path) -> Plan:
    try:
        plan = Plan.model_validate_json(data)
    except ValueError:
        raise RunInputError(
            f"{where}: the run's plan was made by another qlc version; use that version"
        ) from None
    return plan.for_smoke() if smoke else plan


def check_model_files(path: Path, recorded: dict[str, str]) -> None:
    if not is_dir(path):
        raise RunInputError(f"base model directory {path} is missing: pass --model PATH")
    found = hash_dir(path)
    for name in sorted(set(recorded) | set(found)):
        if name not in found:
            raise RunInputError(f"base model {path}: {name} is missing (the run used it)")
        if name not in recorded:
            raise RunInputError(f"base model {path}: {name} was not part of the run's model")
        if found[name] != recorded[name]:
            raise RunInputError(
                f"base model {path}: {name} differs from the file the run trained on "
                f"(sha256 {found[name][:12]}... != recorded {recorded[name][:12]}...)"
            )


def recorded_model_dir(run_dir: Path, manifest: dict[str, Any]) -> Path:
    """Where the run's local model is now: its recorded path when it exists here, the run's own
    smoke model, or the recorded spec's model.path (a container saw it at /inputs/model)."""
    model = manifest["predicate"].get("inputs", {}).get("model", {})
    recorded = Path(model.get("path") or "")
    if model.get("path") and recorded.is_dir():
        return recorded
    if (run_dir / "smoke-model").is_dir():  # the container's /out/smoke-model
        return run_dir / "smoke-model"
    spec_path = recorded_spec(manifest)
    if spec_path is not None:
        from qlc.compiler.load import SpecError, load_spec_file

        try:
            spec, _ = load_spec_file(spec_path)
        except SpecError:
            spec = None
        if spec is not None and spec.model.path is not None:
            found: Path = (spec_path.resolve().parent / spec.model.path).resolve()
            return found
    raise RunInputError(
        f"the run's base model was at {model.get('path')!r}, which is not here: pass --model PATH"
    )


def resolve_base(run_dir: Path, manifest: dict[str, Any], override: Path | None) -> BaseModelRef:
    model = manifest["predicate"].get("inputs", {}).get("model", {})
    recorded = model.get("files") or {}
    if not recorded:  # a hub model, pinned by its revision
        if override is not None:
            raise RunInputError(
                f"the run loaded {model.get('id')!r} from the hub and recorded no file hashes "
                f"to check {override} against: leave out --model"
            )
        if not model.get("id"):
            raise RunInputError(f"{run_dir / MANIFEST}: records neither model files nor a hub id")
        return BaseModelRef(model["id"], model.get("revision"), local=False)
    path = override or recorded_model_dir(run_dir, manifest)
    check_model_files(path, recorded)
    return BaseModelRef(str(path), None, local=True)


def open_run(run: Path, base_model_path: Path | None = None) -> RunInputs:
    """Read and verify a run (directory or manifest path); raise RunInputError if untrusted."""
    run_dir, manifest, manifest_sha = read_manifest(Path(run))
    adapter = verify_adapter(run_dir, manifest)
    plan = find_plan(run_dir, manifest)
    base = resolve_base(run_dir, manifest, base_model_path)
    return RunInputs(run_dir, manifest, manifest_sha, plan, adapter, base)


def load_tokenizer(inputs: RunInputs) -> Any:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(inputs.adapter_dir))  # saved by training
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    return tokenizer


def load_model(inputs: RunInputs, dtype: Any = None) -> Any:
    """The base model as training loaded it (4-bit per the plan, its compute dtype; on a
    machine without CUDA, float32 compute as the smoke variant), or, given a dtype, its full
    weights in that dtype."""
    import torch
    from transformers import AutoModelForCausalLM

    from qlc.trainer.model import bnb_config, torch_dtype

    plan = inputs.plan
    cuda = torch.cuda.is_available()
    kwargs: dict[str, Any] = {}
    if dtype is None:
        quant = plan.quantization if cuda else plan.for_smoke().quantization
        kwargs["quantization_config"] = bnb_config(quant)  # None: not 4-bit
        dtype = torch_dtype(quant.compute_dtype)
    model: Any = AutoModelForCausalLM.from_pretrained(
        inputs.base.source,
        revision=inputs.base.revision,
        token=os.environ.get("HF_TOKEN") or None,
        trust_remote_code=plan.model.trust_remote_code,
        dtype=dtype,
        device_map={"": 0} if cuda else None,
        **kwargs,
    )
    return model.eval()


def with_adapter(model: Any, inputs: RunInputs) -> Any:
    from peft import PeftModel

    return PeftModel.from_pretrained(model, str(inputs.adapter_dir), is_trainable=False).eval()


def render_prompt(plan: Plan, prompt: str, tokenizer: Any) -> str:
    """The text a generation starts from, as training rendered the prompt part of an example."""
    from qlc.trainer.render import prompt_text

    return prompt_text(prompt, plan.data, tokenizer)


def encode(prompt: str, tokenizer: Any) -> dict[str, Any]:
    """Token ids as training made them (on the CPU)."""
    from qlc.trainer.sample import encode as encode_ids

    return encode_ids(tokenizer, prompt, "cpu")


def generate(
    run: Path,
    prompts: list[str],
    max_new_tokens: int = 64,
    temperature: float = 0.0,
    seed: int | None = None,
    base_model_path: Path | None = None,
    use_adapter: bool = True,
) -> list[str]:
    """Completions of `prompts` by the run's base model plus adapter (or the base alone).

    temperature 0 decodes greedily; above 0 it samples, seeded per prompt with `seed` (default:
    the run's job.seed), so the same call gives the same text on the same machine.
    """
    import torch

    if max_new_tokens < 1:
        raise RunInputError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
    if temperature < 0:
        raise RunInputError(f"temperature must be 0 (greedy) or more (got {temperature})")
    from qlc.trainer.sample import complete

    inputs = open_run(run, base_model_path)
    tokenizer = load_tokenizer(inputs)
    model = load_model(inputs)
    if use_adapter:
        model = with_adapter(model, inputs)
    seed = inputs.plan.job.seed if seed is None else seed
    sampling = {
        "do_sample": temperature > 0,
        **({"temperature": temperature} if temperature else {}),
    }
    answers = []
    for prompt in prompts:
        torch.manual_seed(seed)
        text = render_prompt(inputs.plan, prompt, tokenizer)
        answers.append(complete(model, tokenizer, text, max_new_tokens, **sampling))
    return answers
