"""The qlc command line: parse arguments, call one compiler or runtime function, print, exit.

Exit codes: 0 success, 2 user error (bad spec, bad arguments), 1 run failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from typer.core import TyperGroup

from qlc import __version__
from qlc.compiler.explain import (
    Setting,
    card_warnings,
    explain,
    input_lines,
    memory_json,
    memory_lines,
    settings_json,
    settings_lines,
)
from qlc.compiler.load import Diagnostic, SpecError, load_spec_file, read_spec_and_lock
from qlc.compiler.spec import Spec
from qlc.userio import (
    UnreadableFile,
    clip_words,
    is_dir,
    is_file,
    output_problem,
    read_user_file,
)

if TYPE_CHECKING:  # the compiler's render path loads lazily: validate stays fast
    from qlc.compiler.context import BuildContext
    from qlc.compiler.plan import Plan
    from qlc.compiler.shapes import ModelShape
    from qlc.runtime.export import Export


@contextlib.contextmanager
def clipped_usage_errors() -> Iterator[None]:
    """A usage error (an unknown command or option, a bad value) repeats what was typed:
    clip it like every other message, then let typer show it as usual."""
    try:
        yield
    except typer.TyperException as error:
        message = getattr(error, "message", None)
        if isinstance(message, str):
            error.message = clip_words(message)
        raise


class ClippingGroup(TyperGroup):
    """qlc's command group: typer's, with usage errors clipped (clipped_usage_errors)."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with clipped_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with clipped_usage_errors():
            return super().invoke(ctx)


app = typer.Typer(
    cls=ClippingGroup,
    name="qlc",
    help="qlc: a declarative QLoRA fine-tuning compiler and containerized runner.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

MAX_PROMPTS_BYTES = 16 << 20
MAX_MODEL_CONFIG_BYTES = 4 << 20
SpecArg = Annotated[Path, typer.Argument(help="A qlc TOML spec, e.g. specs/guanaco.toml.")]


class UserError(Exception):
    """Something the user must fix: printed without a traceback, exit 2."""


class RunFailure(Exception):
    """A build or run that failed: printed with its cause and fix, exit 1."""


def print_warnings(warnings: list[str]) -> None:
    for warning in warnings:
        err.print(f"warning: {warning}", markup=False)


def compile_path(spec_path: Path, require_lock: bool = True) -> BuildContext:
    from qlc.compiler.context import compile_spec

    source, lock = read_spec_and_lock(spec_path)
    return compile_spec(source, str(spec_path), lock, require_lock=require_lock)


@app.command()
def validate(
    specs: Annotated[list[Path], typer.Argument(help="Spec files to check.")],
    inputs: Annotated[
        bool,
        typer.Option(
            "--inputs",
            help="Also check the inputs: paths exist, the model is of model.architecture, the "
            "fields data.format reads are in the first rows, the chat template can mask "
            "prompts (reads the files, and a local tokenizer).",
        ),
    ] = False,
) -> None:
    """Check specs; print every problem as FILE:LINE:COL: key: message. Exit 0 or 2."""
    from qlc.compiler.context import plan_spec

    failed = False
    for path in specs:
        try:
            source, _ = read_spec_and_lock(path)
            plan, warnings = plan_spec(source, str(path))
        except (SpecError, UserError) as error:
            failed = True
            err.print(str(error), markup=False)
            continue
        print_warnings([str(w) for w in warnings])
        if inputs and not validate_inputs(plan, path):
            failed = True
            continue
        out.print(f"{path}: ok" + (" (inputs too)" if inputs else ""), markup=False)
    if failed:
        raise typer.Exit(2)


def validate_inputs(plan: Plan, path: Path, quick: bool = False) -> bool:
    """Print what `check_inputs` found; whether the inputs are fit to train on."""
    from qlc.runtime.inputs import check_inputs

    report = check_inputs(plan, path, quick=quick)
    print_warnings([f"{path}: {warning}" for warning in report.warnings])
    for problem in report.problems:
        err.print(f"{path}: error: {problem}", markup=False)
    if report.ok and not quick:
        for line in report.checked:
            out.print(f"  {line}", markup=False)
    return report.ok


@app.command(name="init")
def init_command(
    data: Annotated[
        Path | None,
        typer.Option("--data", help="A data file (.jsonl, .json, .parquet, .csv) to train on."),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", help="Base model: a hub id (org/name) or a local directory."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="The spec to write (default: <data name>.toml)."),
    ] = None,
) -> None:
    """Write a first spec, commented, with the data's format and fields detected from its first
    rows; print the next commands. An existing file is never replaced."""
    from qlc.runtime.init_spec import InitError, init_spec

    try:
        written = init_spec(data, model, output)
    except InitError as error:
        raise UserError(f"error: {error}") from None
    found = written.detected
    out.print(f"{written.path}: format {found.format!r} ({found.how})", markup=False)
    print_warnings(found.notes)
    out.print("next:\n" + "\n".join(f"  {command}" for command in written.commands), markup=False)


@app.command(name="data")
def data_command(
    spec: SpecArg,
    rows: Annotated[
        int, typer.Option("--rows", min=0, help="Training examples shown with their loss mask.")
    ] = 3,
    histogram: Annotated[
        Path | None,
        typer.Option("--histogram", help="Write the token-length histogram to this PNG."),
    ] = None,
    sample: Annotated[
        int,
        typer.Option("--sample", min=1, help="Training rows tokenized; more are estimated."),
    ] = 5000,
) -> None:
    """Show the training data as training will see it (CPU, the tokenizer only): the first
    examples rendered with their loss mask, the counts of rows left out, truncated and
    dropped, BOS/EOS checks, the token-length histogram and the plan's steps and tokens."""
    from qlc.compiler.context import plan_spec
    from qlc.runtime import data_show as show
    from qlc.runtime.data_preview import PreviewError, preview, write_histogram_png

    source, _ = read_spec_and_lock(spec)
    plan, warnings = plan_spec(source, str(spec))
    print_warnings([str(w) for w in warnings])
    try:
        found = preview(plan, spec, rows, sample)
    except PreviewError as error:
        raise UserError(f"{spec}: {error}") from None
    styled = out.is_terminal
    out.print(show.legend(styled), markup=False)
    for shown in found.shown:
        out.print(show.example_header(shown, found.estimate.examples), markup=False)
        out.print(show.example_text(shown, styled))
    lengths = found.train.full_lengths
    lines = [*show.summary_lines(found), *show.check_lines(found)]
    lines += show.histogram_lines(lengths, plan.data.max_length) + show.schedule_lines(found)
    out.print("\n".join(lines), markup=False)
    if histogram is not None:
        write_histogram_png(lengths, plan.data.max_length, histogram, f"{spec}: token lengths")
        out.print(f"histogram: {histogram}", markup=False)


@app.command(name="explain")
def explain_command(
    spec: SpecArg,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    gpu: Annotated[
        str | None,
        typer.Option(
            "--gpu",
            help="Check the memory estimate against this GPU (H100, L4, V100, ...) or a "
            "memory size (24GB): exit 1 when the job does not fit it.",
        ),
    ] = None,
) -> None:
    """Show what will train (every resolved setting, the spec keys it came from, and every
    substitution), every spec value and whether the spec or a default set it, and the
    predicted peak GPU memory of training (with --gpu: whether it fits that card).

    Exit 0; with --gpu, 0 when the job fits the card and 1 when it does not (text and --json
    alike; without an estimate, for a model qlc knows no shape of, 0 and the reason); 2 for a
    bad spec or an unknown GPU."""
    from qlc.compiler.context import plan_spec
    from qlc.compiler.memory import check_fit, estimate
    from qlc.compiler.shapes import UnknownGpu, UnknownShape, find_gpu

    source, _ = read_spec_and_lock(spec)
    plan, warnings = plan_spec(source, str(spec))
    loaded, _ = load_spec_file(spec)
    try:
        card = find_gpu(gpu) if gpu is not None else None
    except UnknownGpu as error:
        raise UserError(f"error: --gpu: {error}") from None
    rows = explain(loaded)
    fits = True
    print_warnings(card_warnings(plan, card) if card is not None else [])
    try:
        memory = estimate(plan, local_model_shape(spec, loaded), card)
        fit = check_fit(memory, card) if card is not None else None
        fits = fit is None or fit.fits
        memory_out: dict[str, object] = memory_json(memory, fit)
        memory_text = memory_lines(memory, fit)
    except UnknownShape as error:
        memory_out, memory_text = {"error": str(error)}, [f"no memory estimate: {error}"]
    if as_json:
        shown: dict[str, object] = {r.key: {"value": r.value, "source": r.source} for r in rows}
        out.print_json(json.dumps({**settings_json(plan), "spec": shown, "memory": memory_out}))
    else:
        print_explanation(spec, plan, rows, warnings, memory_text)
    if not fits:
        raise typer.Exit(1)


def print_explanation(
    spec: Path,
    plan: Plan,
    rows: list[Setting],
    warnings: list[Diagnostic],
    memory_text: list[str],
) -> None:
    print_warnings([str(w) for w in warnings])
    out.print("\n".join(settings_lines(plan) + input_lines(plan)) + "\n", markup=False)
    if out.is_terminal:
        table = Table("key", "value", "from", "meaning", title=f"{spec}: every spec value")
        for row in rows:
            table.add_row(row.key, row.shown, row.source, row.description)
        out.print(table)
    else:
        out.print("spec (every value, from the spec or a default):", markup=False)
        width = max(len(row.key) for row in rows)
        for row in rows:
            out.print(f"  {row.key:<{width}}  {row.shown}  ({row.source})", markup=False)
    out.print("\n" + "\n".join(memory_text), markup=False)


def local_model_shape(spec_path: Path, spec: Spec) -> ModelShape | None:
    """The shape in a local model directory's config.json (model.path), if there is one."""
    from qlc.compiler.shapes import UnknownShape, shape_from_config

    if spec.model.path is None:
        return None
    directory = Path(spec.model.path)
    config = (
        directory if directory.is_absolute() else spec_path.parent / directory
    ) / "config.json"
    if not os.path.lexists(config):
        return None
    try:
        document = json.loads(read_user_file(config, MAX_MODEL_CONFIG_BYTES))
    except UnreadableFile as error:
        raise UnknownShape(f"{config}: cannot read the model config ({error.reason})") from None
    except (UnicodeDecodeError, ValueError) as error:
        raise UnknownShape(f"{config}: cannot read the model config ({error})") from None
    if not isinstance(document, dict):
        raise UnknownShape(f"{config}: not a JSON object")
    return shape_from_config(document, str(config))


@app.command()
def schema() -> None:
    """Print the JSON Schema of the spec language."""
    out.print(json.dumps(Spec.model_json_schema(), indent=2, sort_keys=True), markup=False)


@app.command(name="compile")
def compile_command(
    spec: SpecArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="Directory for the context.")],
) -> None:
    """Compile a spec into a Docker build context (needs its committed lock; no network)."""
    from qlc.runtime.write_context import OutputRefused, write_context

    context = compile_path(spec)
    try:
        write_context(context, output)
    except OutputRefused as error:
        raise UserError(f"error: {error}") from None
    print_warnings(context.warnings)
    out.print(f"{output}: {len(context.files)} files, {context.content_hash}", markup=False)


@app.command(name="lock")
def lock_command(
    spec: SpecArg,
    refresh_base: Annotated[
        bool,
        typer.Option("--refresh-base", help="Also check the base image digest with its registry."),
    ] = False,
) -> None:
    """Resolve the spec's Python stack with sha256 hashes into SPEC's .lock (needs PyPI)."""
    from qlc.runtime.lock import LockFailure, check_base_image, lock_spec, plan_for

    try:
        if refresh_base:
            image = plan_for(spec).base_image
            digest = check_base_image(image)
            out.print(f"{image.repository}:{image.tag}: {digest} (matches the pin)", markup=False)
        path = lock_spec(spec)
    except LockFailure as error:
        raise RunFailure(str(error)) from None
    out.print(f"{path}: locked; commit it beside {spec}", markup=False)


RunArg = Annotated[Path, typer.Argument(help="A run directory or its manifest.json.")]
PublishedRunArg = Annotated[
    Path,
    typer.Argument(help="A run directory, its manifest.json, or oci:HOST/REPO@sha256:..."),
]
ModelOption = Annotated[
    Path | None,
    typer.Option("--model", help="Local base model directory (its files must match the run's)."),
]


def read_prompts(prompts: list[str], prompts_file: Path | None) -> list[str]:
    """--prompt values, then the file's: one per line, or a .jsonl of strings / {"prompt": ...}."""
    found = list(prompts)
    if prompts_file is not None:
        try:
            lines = read_user_file(prompts_file, MAX_PROMPTS_BYTES).decode("utf-8").splitlines()
        except UnreadableFile as error:
            raise UserError(f"{prompts_file}: cannot read the prompts: {error.reason}") from None
        except UnicodeDecodeError as error:
            raise UserError(f"{prompts_file}: cannot read the prompts: not UTF-8 text "
                            f"(byte {error.start})") from None  # fmt: skip
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            if prompts_file.suffix != ".jsonl":
                found.append(line)
                continue
            try:
                item = json.loads(line)
            except ValueError:
                raise UserError(f"{prompts_file}:{number}: not a JSON line") from None
            prompt = item.get("prompt") if isinstance(item, dict) else item
            if not isinstance(prompt, str):
                raise UserError(f'{prompts_file}:{number}: expected a string or {{"prompt": ...}}')
            found.append(prompt)
    if not found:
        raise UserError("no prompt: pass --prompt TEXT or --prompts FILE")
    return found


@app.command(name="generate")
def generate_command(
    run: PublishedRunArg,
    prompt: Annotated[
        list[str] | None, typer.Option("--prompt", help="A prompt (repeat for several).")
    ] = None,
    prompts_file: Annotated[
        Path | None,
        typer.Option("--prompts", help="Prompts, one per line (or .jsonl strings/objects)."),
    ] = None,
    max_new_tokens: Annotated[int, typer.Option("--max-new-tokens", min=1)] = 64,
    temperature: Annotated[
        float, typer.Option("--temperature", min=0.0, help="0: greedy; above 0: sampling.")
    ] = 0.0,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Sampling seed (default: the run's seed).")
    ] = None,
    model: ModelOption = None,
    no_adapter: Annotated[
        bool, typer.Option("--no-adapter", help="The base model alone, for comparison.")
    ] = False,
) -> None:
    """Generate with a run's base model + adapter, prompts rendered as training rendered them."""
    from qlc.runtime.generate import RunInputError, generate

    prompts = read_prompts(prompt or [], prompts_file)
    run = open_target(run)
    try:
        answers = generate(
            run, prompts, max_new_tokens, temperature, seed, model, use_adapter=not no_adapter
        )
    except RunInputError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise RunFailure(f"cannot load the model: {error}") from None
    for index, (asked, answer) in enumerate(zip(prompts, answers, strict=True)):
        if len(prompts) > 1:
            out.print(f"--- prompt {index + 1}: {asked}", markup=False)
        out.print(answer, markup=False)


@app.command(name="merge")
def merge_command(
    run: RunArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="New directory for the model.")],
    dtype: Annotated[str, typer.Option("--dtype", help="bf16 or fp16 weights.")] = "bf16",
    model: ModelOption = None,
    output_format: Annotated[
        str, typer.Option("--format", help="hf (safetensors) or gguf (llama.cpp / Ollama).")
    ] = "hf",
    quant: Annotated[str, typer.Option("--quant", help="gguf: f16, q8_0 or q4_k_m.")] = "q8_0",
) -> None:
    """Merge a run's adapter into its base (bf16/fp16), verify the logits, write merge.json;
    --format gguf: convert with llama.cpp, verify tokens and logits, write a Modelfile."""
    from qlc.runtime.generate import RunInputError
    from qlc.runtime.merge import MergeVerificationError, merge

    if output_format not in ("hf", "gguf"):
        raise UserError(f"--format must be hf or gguf (got {output_format!r})")
    if output_format == "gguf":
        merge_gguf_command(run, output, quant, dtype, model)
        return
    try:
        record = merge(run, output, dtype, model)
    except RunInputError as error:
        raise UserError(str(error)) from None
    except MergeVerificationError as error:
        raise RunFailure(str(error)) from None
    except OSError as error:
        raise RunFailure(f"cannot load or write the model: {error}") from None
    out.print(
        f"{output}: merged in {record.dtype}; logits max |diff| {record.max_abs_diff:.3g} "
        f"<= {record.tolerance['bound']:.3g} on {record.prompts} prompts (adapter effect "
        f"{record.adapter_effect_max_abs:.3g}); record in {output / 'merge.json'}",
        markup=False,
    )


def merge_gguf_command(run: Path, output: Path, quant: str, dtype: str, model: Path | None) -> None:
    from qlc.runtime.generate import RunInputError
    from qlc.runtime.gguf_tools import GgufToolError
    from qlc.runtime.merge import MergeVerificationError
    from qlc.runtime.merge_gguf import GgufVerificationError, merge_gguf
    from qlc.runtime.modelfile import ModelfileError

    try:
        record = merge_gguf(run, output, quant, dtype, model)
    except RunInputError as error:
        raise UserError(str(error)) from None
    except (MergeVerificationError, GgufVerificationError, GgufToolError) as error:
        raise RunFailure(str(error)) from None
    except ModelfileError as error:
        raise RunFailure(f"no Modelfile: {error}; nothing was written") from None
    except OSError as error:
        raise RunFailure(f"cannot load or write the model: {error}") from None
    check = record["verification"]
    out.print(
        f"{output / record['gguf']['file']}: {quant}; llama.cpp tokenizes "
        f"{check['token_texts']} texts as HF does; logits max |diff| "
        f"{check['max_abs_diff']:.3g} <= {check['tolerance']['bound']:.3g}, mean "
        f"{check['mean_abs_diff']:.3g} <= {check['tolerance']['mean_bound']:.3g} on "
        f"{check['prompts']} prompts (top-1 agreement {check['top1_agreement']:.1%}); "
        f"Modelfile and merge.json beside it",
        markup=False,
    )


def open_target(run: Path) -> Path:
    """A run directory, or oci:HOST/REPO@sha256:... pulled (once) into .qlc/pulled/."""
    from qlc.runtime.oci_artifact import PullError, cached_run
    from qlc.runtime.oci_registry import RegistryError
    from qlc.runtime.records import state_dir

    text = str(run)
    if not text.startswith("oci:"):
        return run
    try:
        pulled: Path = cached_run(text, state_dir(Path.cwd()) / "pulled")
    except PullError as error:
        raise UserError(str(error)) from None
    except (RegistryError, OSError) as error:
        raise RunFailure(f"cannot pull {text}: {error}") from None
    return pulled


@app.command(name="publish")
def publish_command(
    run: RunArg,
    to: Annotated[
        str, typer.Option("--to", help="hf:ORG/NAME (Hugging Face Hub) or oci:HOST/REPO[:TAG].")
    ],
    merged: Annotated[
        bool, typer.Option("--merged", help="hf: upload the verified merge, not the adapter.")
    ] = False,
    public: Annotated[bool, typer.Option("--public", help="hf: a public repository.")] = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print what would be uploaded; send nothing.")
    ] = False,
    model: ModelOption = None,
) -> None:
    """Publish a verified run: its adapter, card, manifest and report (nothing when a hash
    differs). hf: one Hub commit (private unless --public, token from HF_TOKEN); oci: an ORAS
    artifact pushed by digest."""
    from qlc.runtime.generate import RunInputError
    from qlc.runtime.publish import PublishError, parse_target

    try:
        target = parse_target(to)
        if target.scheme == "oci" and (merged or public):
            raise PublishError("--merged and --public are for hf: targets")
        if target.scheme == "hf":
            publish_hub(run, target.name, merged, not public, dry_run, model)
        else:
            publish_oci_target(run, target.name, target.tag, dry_run, model)
    except (PublishError, RunInputError) as error:
        raise UserError(str(error)) from None


def publish_hub(
    run: Path, repo: str, merged: bool, private: bool, dry_run: bool, model: Path | None
) -> None:
    from qlc.runtime.merge import MergeVerificationError
    from qlc.runtime.publish import record_publication
    from qlc.runtime.publish_hub import HfHub, HubError, hub_token, planned_upload, upload

    token = None if dry_run else hub_token()
    try:
        with planned_upload(run, repo, merged, private, model) as plan:
            for line in plan.lines():
                out.print(line, markup=False)
            if token is None:
                out.print("dry run: nothing was uploaded", markup=False)
                return
            url = upload(plan, HfHub(), token)
    except MergeVerificationError as error:
        raise RunFailure(str(error)) from None
    except (HubError, OSError) as error:
        raise RunFailure(str(error)) from None
    record_publication(Path(run) if Path(run).is_dir() else Path(run).parent, f"hf:{repo}", url)
    out.print(url, markup=False)


def publish_oci_target(
    run: Path, repository: str, tag: str | None, dry_run: bool, model: Path | None
) -> None:
    from qlc.runtime.oci_artifact import artifact_manifest, publish_oci
    from qlc.runtime.oci_registry import RegistryError, split_repository
    from qlc.runtime.publish import PublishError, verified_run

    try:
        split_repository(repository)
    except RegistryError as error:
        raise PublishError(f"--to oci:{repository}: {error}") from None
    if dry_run:
        inputs, files = verified_run(run, model, with_plan=True)
        created = (inputs.manifest["predicate"].get("run") or {}).get("finished_at")
        out.print(artifact_manifest(files, created).decode(), markup=False)
        out.print("dry run: nothing was pushed", markup=False)
        return
    try:
        pushed = publish_oci(run, repository, tag, model)
    except RegistryError as error:
        raise RunFailure(str(error)) from None
    tagged = f", tag {pushed.tag}" if pushed.tag else ""
    out.print(
        f"{pushed.reference} ({pushed.layers} files, {pushed.bytes} bytes{tagged}); recorded "
        "in the run's published.json",
        markup=False,
    )


@app.command(name="pull")
def pull_command(
    reference: Annotated[str, typer.Argument(help="oci:HOST/REPO@sha256:... (qlc publish).")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New directory for the run.")],
) -> None:
    """Pull a published run by digest into a new directory, verified against its records."""
    from qlc.runtime.oci_artifact import PullError, pull_run
    from qlc.runtime.oci_registry import RegistryError

    try:
        where = pull_run(reference, output)
    except PullError as error:
        raise UserError(str(error)) from None
    except (RegistryError, OSError) as error:
        raise RunFailure(f"cannot pull {reference}: {error}") from None
    out.print(f"{where}: verified (manifest.sha256, subjects, records)", markup=False)


@app.command(name="build")
def build_command(
    spec: SpecArg,
    base_image: Annotated[
        str | None,
        typer.Option(
            "--base-image",
            help="Build FROM this image instead of the pinned base "
            "(air-gapped or test builds; recorded).",
        ),
    ] = None,
) -> None:
    """Build the spec's image (tag qlc/<job>:<content hash>); unchanged specs hit the cache."""
    from qlc.runtime.build import build

    with runtime_errors():
        record = build(spec, base_image)
    how = "cache hit, no rebuild" if record.cache_hit else "built"
    out.print(f"{record.tag} {record.image_id} ({how}, {record.build_seconds:.1f}s)", markup=False)


@app.command(name="run")
def run_command(
    target: Annotated[
        str | None,
        typer.Argument(
            help="A spec (built first) or an image qlc built; default: the project's last build."
        ),
    ] = None,
    local: Annotated[
        bool, typer.Option("--local", help="Run the compiled script in this Python, no Docker.")
    ] = False,
    smoke: Annotated[bool, typer.Option("--smoke", help="Smoke mode: tiny model, CPU.")] = False,
    base_image: Annotated[
        str | None, typer.Option("--base-image", help="Base image when building a spec.")
    ] = None,
    gpus: Annotated[
        int | None,
        typer.Option(
            "--gpus", min=-1, help="GPUs to request (-1: all); default: the spec's runtime.gpus."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(
            "--resume",
            help="Continue an unfinished run of the same plan in this run directory, from its "
            "last complete checkpoint.",
        ),
    ] = None,
    env: Annotated[
        list[str] | None,
        typer.Option(
            "--env",
            help="NAME=VALUE for the training process (repeat). Yours to set, including what a "
            "spec may not (PYTHONPATH, HF_ENDPOINT, ...).",
        ),
    ] = None,
) -> None:
    """Run a training job in a container (GPU passthrough), or --local; writes a manifest."""
    from qlc.runtime.launch import LaunchError, parse_env_options
    from qlc.runtime.run import RunFailed, run

    if resume is not None and not is_dir(resume):
        raise UserError(f"--resume {resume}: no such run directory")
    try:
        extra = parse_env_options(env or [])
    except LaunchError as error:
        raise UserError(str(error)) from None
    if target is not None and is_file(Path(target)):  # a spec: its inputs before any build
        check_spec_inputs(Path(target))
    with runtime_errors():
        try:
            result = run(target, local=local, smoke=smoke, base_image=base_image, gpus=gpus,
                         run_dir=resume, extra_env=extra)  # fmt: skip
        except RunFailed as failure:
            if failure.user_error:
                raise UserError(str(failure)) from None
            raise RunFailure(str(failure)) from None
    out.print(f"{result.run_dir}: {result.status} (manifest.json, report.md)", markup=False)


def check_spec_inputs(spec: Path) -> None:
    """The inputs checks that need no tokenizer (seconds), before a build or a launch."""
    from qlc.compiler.context import plan_spec

    source, _ = read_spec_and_lock(spec)
    plan, _ = plan_spec(source, str(spec))
    if not validate_inputs(plan, spec, quick=True):
        raise UserError(f"{spec}: the inputs above must be fixed before the run (nothing ran)")


@app.command(name="reproduce")
def reproduce_command(
    manifest: Annotated[Path, typer.Argument(help="A run's manifest.json.")],
    rebuild: Annotated[
        bool,
        typer.Option(
            "--rebuild", help="Build from the spec even if the recorded image is still there."
        ),
    ] = False,
    local: Annotated[
        bool,
        typer.Option("--local", help="Rerun in this Python, no Docker (as `qlc run --local`)."),
    ] = False,
) -> None:
    """Rerun a recorded run; print a verdict per item. Exit 0 reproduced, 1 not."""
    from qlc.runtime.reproduce import reproduce

    with runtime_errors():
        result = reproduce(manifest, reuse_image=not rebuild, local=local)
    for verdict in result.verdicts:
        mark = "ok  " if verdict.ok else "DIFF"
        out.print(f"{mark} {verdict.item}: {verdict.detail}", markup=False)
    if result.rerun_dir is not None:
        out.print(f"rerun: {result.rerun_dir}", markup=False)
    out.print("reproduced" if result.reproduced else "not reproduced", markup=False)
    if not result.reproduced:
        raise typer.Exit(1)


def build_to_push(target: str | None) -> tuple[str, str | None]:
    """(image tag, job whose build record gets the digest) for `qlc push [SPEC|IMAGE]`."""
    from qlc.runtime import records

    project = Path.cwd()
    if target is None:
        record = records.last_build(project)
        return record.tag, record.job
    if target.endswith(".toml") or is_file(Path(target)):
        spec, _ = load_spec_file(Path(target))
        found = records.job_build(project, spec.job.name)
        if found is None:
            raise UserError(
                f"{target}: job {spec.job.name!r} is not built: run `qlc build {target}`"
            )
        return found.tag, found.job
    builds = sorted(records.state_dir(project).glob("builds/*.json"))
    jobs = [records.load_build(path) for path in builds]
    return target, next((record.job for record in jobs if record.tag == target), None)


@app.command(name="push")
def push_command(
    target: Annotated[
        str | None,
        typer.Argument(help="A built spec or a local image; default: the project's last build."),
    ] = None,
    registry: Annotated[
        str, typer.Option("--registry", help="HOST[:PORT]/REPO to push to, e.g. ghcr.io/acme/qlc.")
    ] = ...,  # type: ignore[assignment]
) -> None:
    """Push a built image (Docker's credential config; never stored) and record its digest."""
    from qlc.runtime import records
    from qlc.runtime.push import PushError, check_registry, push

    try:
        check_registry(registry)
    except PushError as error:
        raise UserError(str(error)) from None
    with runtime_errors():
        image, job = build_to_push(target)
        try:
            result = push(image, registry)
        except PushError as error:
            raise RunFailure(str(error)) from None
        if job is not None:
            records.record_push(Path.cwd(), job, result.pushed_tag, result.reference)
    where = f"; recorded in the build record of {job}" if job else ""
    out.print(f"{result.reference}{where}", markup=False)


@app.command(name="export")
def export_command(
    spec: SpecArg,
    target: Annotated[
        str, typer.Option("--target", help="kubernetes|aws-batch|gcp-batch|skypilot")
    ],
    nodes: Annotated[
        int,
        typer.Option(
            "--nodes",
            help="Nodes: several run torchrun with elastic c10d rendezvous (Kubernetes: a "
            "JobSet on ReadWriteMany storage).",
        ),
    ] = 1,
    gpus_per_node: Annotated[
        int | None, typer.Option("--gpus-per-node", help="Default: the spec's runtime.gpus.")
    ] = None,
    image: Annotated[
        str | None,
        typer.Option("--image", help="repo@sha256:... to run; default: the job's pushed image."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Directory (default export/JOB/TARGET).")
    ] = None,
    kueue_queue: Annotated[
        str | None, typer.Option("--kueue-queue", help="Kubernetes: Kueue LocalQueue label.")
    ] = None,
    volume: Annotated[
        str | None,
        typer.Option(
            "--volume",
            help="Kubernetes PVC (ReadWriteMany for several nodes) or AWS EFS id (fs-...) for "
            "a relative output_dir.",
        ),
    ] = None,
    retries: Annotated[
        int,
        typer.Option(
            "--retries",
            help="Retries after preemption only (never after a user error); needs "
            "train.save_steps in the spec. 0: none.",
        ),
    ] = 3,
    spot: Annotated[
        bool,
        typer.Option(
            "--spot", help="GCP Batch, SkyPilot: Spot VMs (AWS multi-node jobs cannot run on Spot)."
        ),
    ] = False,
    instance_type: Annotated[
        str | None, typer.Option("--instance-type", help="AWS instance / GCP machine type.")
    ] = None,
    accelerator: Annotated[
        str | None, typer.Option("--accelerator", help="SkyPilot GPU name / GCP GPU type.")
    ] = None,
    job_queue: Annotated[
        str | None, typer.Option("--job-queue", help="AWS Batch: also write submit-job.json.")
    ] = None,
    project: Annotated[
        str | None, typer.Option("--project", help="GCP Batch: project of the secrets.")
    ] = None,
    execution_role: Annotated[
        str | None, typer.Option("--execution-role", help="AWS Batch: role that reads secrets.")
    ] = None,
    efs_access_point: Annotated[
        str | None,
        typer.Option(
            "--efs-access-point",
            help="AWS Batch: EFS access point (fsap-...) with POSIX user 10001:10001, required "
            "with --volume fs-...",
        ),
    ] = None,
    job_role: Annotated[
        str | None,
        typer.Option(
            "--job-role", help="AWS Batch: the job's IAM role; mounts EFS with IAM authorization."
        ),
    ] = None,
    cpus: Annotated[int | None, typer.Option("--cpus", min=1, help="AWS Batch: vCPUs.")] = None,
    memory_gib: Annotated[
        int | None, typer.Option("--memory-gib", min=1, help="AWS Batch: memory in GiB.")
    ] = None,
    check: Annotated[
        bool,
        typer.Option(
            "--check",
            help="Before writing, run the job's image here as the job's user: output writable "
            "and renamable, memory estimate and GPU architectures against the instance's GPU, "
            "then a smoke run of the job's command (needs Docker).",
        ),
    ] = False,
    force: Annotated[bool, typer.Option("--force", help="Replace existing job files.")] = False,
) -> None:
    """Write ready-to-submit job files that run the pushed image, pinned by digest, in a run
    directory of their own (<output>/<job>/<run id>, the same for every retry)."""
    from qlc.runtime.export import ExportError, export, write_export

    plan = compile_path(spec).plan
    default_dir = Path("export") / plan.job.name / target
    image = image or pushed_image(spec, plan)
    try:
        result = export(
            plan, image, target, nodes=nodes, gpus_per_node=gpus_per_node,
            kueue_queue=kueue_queue, volume=volume, retries=retries,
            instance_type=instance_type, accelerator=accelerator, job_queue=job_queue,
            project=project, execution_role=execution_role, cpus=cpus, memory_gib=memory_gib,
            efs_access_point=efs_access_point, job_role=job_role, spot=spot,
        )  # fmt: skip
        if check:
            check_export(spec, plan, result, image)
        paths = write_export(result.files, output or default_dir, overwrite=force)
    except ExportError as error:
        raise UserError(str(error)) from None
    except OSError as error:
        raise UserError(f"error: {output_problem(output or default_dir, error)}") from None
    for path in paths:
        out.print(f"{path}: {target} job for {image}", markup=False)
    out.print(f"run id: {result.run_id}", markup=False)
    out.print(f"run directory: {result.run_location} ({result.run_dir} in the job)", markup=False)
    for note in result.notes:
        out.print(f"note: {note}", markup=False)


def pushed_image(spec: Path, plan: Plan) -> str:
    """The registry digest recorded when the spec's image was pushed."""
    from qlc.runtime import records

    job = plan.job.name
    with runtime_errors():
        record = records.job_build(Path.cwd(), job)
    if record is None or record.registry_digest is None:
        raise UserError(
            f"{spec}: no pushed image of job {job!r}: run `qlc build {spec}` and "
            f"`qlc push {spec} --registry HOST/REPO`, or pass --image REPO@sha256:..."
        )
    if record.spec_sha256 != plan.spec_sha256:
        raise UserError(f"{spec} changed since its last build: rebuild and push it first")
    digest: str = record.registry_digest
    return digest


def check_export(spec: Path, plan: Plan, result: Export, image: str) -> None:
    """`qlc export --check`: the checks that need no training, then the smoke run; print each
    finding; RunFailure (nothing written) when one fails."""
    import shutil
    import tempfile

    from qlc.runtime.docker_engine import DockerEngine
    from qlc.runtime.export_check import preflight, prepare_stand_in, smoke

    stand_in = Path(tempfile.mkdtemp(prefix="qlc-export-check-")) / "output"
    try:
        with runtime_errors():
            engine = DockerEngine()
            prepare_stand_in(stand_in)
            findings = preflight(plan, result, engine, image, stand_in)
            if all(finding.ok is not False for finding in findings):
                log = Path("export") / plan.job.name / f"check-{result.run_id}.log"
                log.parent.mkdir(parents=True, exist_ok=True)
                findings.append(smoke(engine, image, plan, result, stand_in, os.environ, log, err))
    finally:
        shutil.rmtree(stand_in.parent, ignore_errors=True)
    for finding in findings:
        mark = {True: "ok  ", False: "FAIL", None: "?   "}[finding.ok]
        out.print(f"{mark} {finding.check}: {finding.detail}", markup=False)
    failed = [finding.check for finding in findings if finding.ok is False]
    if failed:
        raise RunFailure(f"qlc export --check: {', '.join(failed)} failed; no job file written")


@contextlib.contextmanager
def runtime_errors() -> Iterator[None]:
    """Map the runtime's errors: the user's to UserError (exit 2), the run's to RunFailure."""
    from qlc.runtime.build import BuildFailure
    from qlc.runtime.docker_engine import EngineError
    from qlc.runtime.launch import LaunchError
    from qlc.runtime.records import RecordError
    from qlc.runtime.reproduce import ReproduceError
    from qlc.runtime.run import RunInputError

    try:
        yield
    except (RunInputError, RecordError, ReproduceError, LaunchError) as error:
        raise UserError(str(error)) from None
    except (EngineError, BuildFailure) as error:
        raise RunFailure(str(error)) from None


@app.command()
def version() -> None:
    """Print qlc's version."""
    out.print(__version__, markup=False)


def main() -> None:
    """Entry point: map errors to exit codes; never show a traceback for a user error.

    Typer's standalone mode handles --help, usage errors (exit 2) and Ctrl-C; qlc's own
    errors propagate out of it and are printed here, a value the user gave clipped to a
    readable length.
    """
    try:
        app()
    except (SpecError, UserError) as error:
        err.print(clip_words(str(error)), markup=False)
        sys.exit(2)
    except RunFailure as error:
        err.print(clip_words(f"error: {error}"), markup=False)
        sys.exit(1)
