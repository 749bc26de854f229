"""The model card: adapter/README.md in the Hugging Face convention, from the run's own records.

Written by the trainer at the end of a successful run, before the final manifest hashes the
adapter directory, so the manifest's subjects certify the card (the card cannot carry the
final manifest's own hash: that would be circular, and the runtime adds its host block later).
The card names the hashes that identify the run instead: adapter files, spec, plan, lock,
base model files and data files.

The YAML header is written by hand: every value is a double-quoted YAML string with every
non-printable or non-ASCII character escaped, so no user string can break out of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from qlc.compiler.plan import Plan
from qlc.contract import (
    ADAPTER_DIR,
    DATA_REPORT_FILE,
    METRICS_FILE,
    MODEL_CARD_FILE,
    sha256_file,
)

CARD_NAME = MODEL_CARD_FILE
PLOT_NAME = "loss.svg"
PLOT_WIDTH, PLOT_HEIGHT, PLOT_MARGIN = 640, 320, 48


def yaml_string(value: str) -> str:
    """A double-quoted YAML scalar holding exactly `value` (ASCII only, every escape explicit)."""
    out = ['"']
    for char in value:
        code = ord(char)
        if char in '"\\':
            out.append("\\" + char)
        elif 0x20 <= code < 0x7F:
            out.append(char)
        elif code <= 0xFFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(f"\\U{code:08x}")
    out.append('"')
    return "".join(out)


def yaml_header(fields: dict[str, str | list[str]]) -> str:
    lines = ["---"]
    for key, value in fields.items():
        if isinstance(value, list):
            lines.append(f"{key}:")
            lines.extend(f"- {yaml_string(item)}" for item in value)
        else:
            lines.append(f"{key}: {yaml_string(value)}")
    lines.append("---")
    return "\n".join(lines) + "\n"


def md(value: Any) -> str:
    """Plain text for a markdown line or table cell: one line, markup characters escaped."""
    text = " ".join(str(value).split())
    return re.sub(r"([\\`*_{}\[\]<>()#+!|~])", r"\\\1", text)


def code(value: Any) -> str:
    """Inline code that survives backticks in the value."""
    text = " ".join(str(value).split())
    fence = "`" * (max((len(run) for run in re.findall(r"`+", text)), default=0) + 1)
    return f"{fence} {text} {fence}" if "`" in text else f"`{text}`"


def table(header: tuple[str, ...], rows: list[tuple[Any, ...]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines.extend("| " + " | ".join(md(cell) for cell in row) + " |" for row in rows)
    return [*lines, ""]


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    records = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def dataset_names(plan: Plan, data_input: dict[str, Any]) -> list[str]:
    if plan.data.sources:
        return [s.hub_id or Path(str(s.local_path)).name for s in plan.data.sources]
    if plan.data.hub_id:
        return [plan.data.hub_id]
    files = sorted(data_input.get("files") or {})
    return files or [Path(str(plan.data.local_path)).name]


def shown_value(key: str, value: Any) -> Any:
    """Bytes as GiB (people read GiB, not 786345984), seconds rounded; other values as they are."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        if key.endswith("_bytes") or key.startswith("peak_memory"):
            return f"{value / 2**30:.2f} GiB"
        if isinstance(value, float):
            return f"{value:.6g}"
    return value


def loss_svg(points: list[tuple[float, float]], eval_points: list[tuple[float, float]]) -> str:
    """A small line chart of training loss (and eval loss as dots) against the step."""
    every = points + eval_points
    xs, ys = [x for x, _ in every], [y for _, y in every]
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    span_x, span_y = (x1 - x0) or 1.0, (y1 - y0) or 1.0
    inner_w, inner_h = PLOT_WIDTH - 2 * PLOT_MARGIN, PLOT_HEIGHT - 2 * PLOT_MARGIN

    def at(x: float, y: float) -> str:
        px = PLOT_MARGIN + (x - x0) / span_x * inner_w
        py = PLOT_MARGIN + (1 - (y - y0) / span_y) * inner_h
        return f"{px:.1f},{py:.1f}"

    line = " ".join(at(x, y) for x, y in points)
    dots = "".join(
        f'<circle cx="{at(x, y).split(",")[0]}" cy="{at(x, y).split(",")[1]}" r="3" '
        'fill="#d62728"/>'
        for x, y in eval_points
    )
    bottom, right = PLOT_HEIGHT - PLOT_MARGIN, PLOT_WIDTH - PLOT_MARGIN
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{PLOT_WIDTH}" height="{PLOT_HEIGHT}" '
        f'font-family="sans-serif" font-size="12">'
        f'<rect width="100%" height="100%" fill="white"/>'
        f'<line x1="{PLOT_MARGIN}" y1="{bottom}" x2="{right}" y2="{bottom}" stroke="black"/>'
        f'<line x1="{PLOT_MARGIN}" y1="{PLOT_MARGIN}" x2="{PLOT_MARGIN}" y2="{bottom}" '
        'stroke="black"/>'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>{dots}'
        f'<text x="{PLOT_MARGIN}" y="{PLOT_MARGIN - 12}">loss (line: train, dots: eval)</text>'
        f'<text x="4" y="{PLOT_MARGIN + 4}">{y1:.4g}</text>'
        f'<text x="4" y="{bottom}">{y0:.4g}</text>'
        f'<text x="{PLOT_MARGIN}" y="{bottom + 18}">step {x0:g}</text>'
        f'<text x="{right - 60}" y="{bottom + 18}">step {x1:g}</text>'
        "</svg>\n"
    )


def write_loss_plot(records: list[dict[str, Any]], adapter: Path) -> str | None:
    """adapter/loss.svg from metrics.jsonl; its file name, or None without two loss points."""

    def series(event: str, key: str) -> list[tuple[float, float]]:
        return [
            (float(r["step"]), float(r[key]))
            for r in records
            if r.get("event", "train") == event
            and isinstance(r.get(key), int | float)
            and isinstance(r.get("step"), int | float)
        ]

    points = series("train", "loss")
    if len(points) < 2:
        return None
    (adapter / PLOT_NAME).write_text(loss_svg(points, series("eval", "eval_loss")), "utf-8")
    return PLOT_NAME


def setup_lines(plan: Plan, predicate: dict[str, Any]) -> list[str]:
    """The effective settings the run trained with (what the manifest records), and every
    substitution: where what trained differs from what the spec wrote, and why."""
    effective = predicate.get("effective") or {}
    rows = [(name, json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value)
            for name, value in effective.items()]  # fmt: skip
    lines = ["## Training setup", "", *table(("setting", "value"), rows)]
    subs = predicate.get("substitutions") or []
    if subs:
        lines += ["Substitutions (asked for by the spec):", ""]
        lines += table(
            ("spec key", "written", "trained with", "why"),
            [(s["key"], s["written"], s["effective"], s["why"]) for s in subs],
        )
    return lines


def data_report_lines(report: Any) -> list[str]:
    if not isinstance(report, dict):
        return ["## Data", "", "No data report was written.", ""]
    splits = [value for value in report.values() if isinstance(value, dict)]
    keys = sorted({key for split in splits for key in split if key != "split"})
    names = [str(split.get("split", "?")) for split in splits]
    rows = [(key, *(split.get(key, "") for split in splits)) for key in keys]
    return ["## Data", "", *table(("", *names), rows)]


def metrics_lines(metrics: dict[str, Any], plot: str | None) -> list[str]:
    lines = ["## Results", ""]
    if metrics:
        rows = [(key, shown_value(key, value)) for key, value in sorted(metrics.items())]
        lines += table(("metric", "value"), rows)
    else:
        lines += ["No metrics were recorded.", ""]
    if plot:
        lines += [f"![training loss]({plot})", ""]
    return lines


def usage_lines(base: str) -> list[str]:
    return [
        "## Use it",
        "",
        "```python",
        "from peft import AutoPeftModelForCausalLM",
        "from transformers import AutoTokenizer",
        "",
        'model = AutoPeftModelForCausalLM.from_pretrained("path/to/this/adapter")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/adapter")',
        "```",
        "",
        f"The base model ({code(base)}) is loaded in 4 bits as in training. With qlc, "
        "`qlc generate RUN --prompt ...` renders prompts the way training did, and "
        "`qlc merge RUN -o DIR` merges the adapter into full-precision base weights.",
        "",
    ]


def provenance_lines(plan: Plan, manifest: dict[str, Any], adapter: Path) -> list[str]:
    predicate = manifest.get("predicate", {})
    inputs = predicate.get("inputs", {})
    model, data, run = inputs.get("model", {}), inputs.get("data", {}), predicate.get("run", {})
    spec_ref = predicate.get("spec") or {"name": plan.spec_name, "sha256": plan.spec_sha256}
    adapter_files = {
        p.name: sha256_file(p)
        for p in sorted(adapter.iterdir())
        if p.is_file() and p.name not in (CARD_NAME, PLOT_NAME)
    }
    rows: list[tuple[Any, ...]] = [
        ("qlc version", predicate.get("qlc_version", plan.qlc_version)),
        ("spec", f"{spec_ref['name']} sha256:{spec_ref['sha256']}"),
        ("plan", f"sha256:{predicate.get('plan_sha256')}"),
        ("lock", f"sha256:{predicate['lock_sha256']}" if predicate.get("lock_sha256") else "none"),
        ("base model", model.get("id") or model.get("path")),
        ("base model revision", model.get("revision") or "none (local files, hashed below)"),
        ("seed / deterministic", f"{run.get('seed')} / {run.get('deterministic')}"),
        ("image", (predicate.get("image") or {}).get("digest") or "none (local run)"),
    ]
    rows += [
        (f"base model file {name}", f"sha256:{h}") for name, h in model.get("files", {}).items()
    ]
    rows += [(f"data file {name}", f"sha256:{h}") for name, h in data.get("files", {}).items()]
    rows += [(f"adapter/{name}", f"sha256:{h}") for name, h in adapter_files.items()]
    return [
        "## Provenance",
        "",
        "The run's `manifest.json` (an in-toto statement) lists every adapter file, this card "
        "included, with its sha256; the runtime writes the manifest's own sha256 to "
        "`manifest.sha256` beside it once the run has ended. The hashes that identify this "
        "adapter:",
        "",
        *table(("what", "sha256 / value"), rows),
        "Reproduce it from the run directory: `qlc reproduce manifest.json`",
        "",
    ]


def write_model_card(run_dir: Path, plan: Plan, manifest: dict[str, Any]) -> Path:
    """Write run_dir/adapter/README.md (and adapter/loss.svg when there are losses). A hub base
    model is named in the header's base_model; a local one is not (it is no hub id): the card
    names its folder and the provenance table its files' hashes."""
    adapter = Path(run_dir) / ADAPTER_DIR
    predicate = manifest.get("predicate", {})
    inputs = predicate.get("inputs", {})
    base = plan.model.name
    fields: dict[str, str | list[str]] = {
        "library_name": "peft",
        "datasets": dataset_names(plan, inputs.get("data", {})),
        "tags": ["qlora", "qlc", "lora", "peft"],
        "pipeline_tag": "text-generation",
    }
    if plan.model.hub_id is not None:
        fields = {"base_model": plan.model.hub_id, **fields}
        fields["tags"] = [*fields["tags"], f"base_model:adapter:{plan.model.hub_id}"]
    plot = write_loss_plot(read_metrics(Path(run_dir) / METRICS_FILE), adapter)
    origin = "the hub model" if plan.model.hub_id else "the local model folder"
    body = [
        f"# {md(plan.job.name)}: a QLoRA adapter for {md(base)}",
        "",
        f"Trained by qlc {md(plan.qlc_version)} from the spec {code(plan.spec_name)} on "
        f"{origin} {code(base)} (data format {code(plan.data.format)}).",
        "",
        *usage_lines(base),
        *setup_lines(plan, predicate),
        *data_report_lines(read_json(Path(run_dir) / DATA_REPORT_FILE)),
        *metrics_lines(predicate.get("metrics") or {}, plot),
        *provenance_lines(plan, manifest, adapter),
    ]
    card = adapter / CARD_NAME
    tmp = adapter / f".{CARD_NAME}.tmp"
    tmp.write_text(yaml_header(fields) + "\n" + "\n".join(body), encoding="utf-8")
    tmp.replace(card)
    return card
