"""The model card: adapter/README.md in the Hugging Face convention, from the run's own records.

Standard library only: this file is copied beside train.py into every build context and runs
inside the container at the end of a successful run, before the final manifest hashes the
adapter directory, so the manifest's subjects certify the card (the card cannot carry the
final manifest's own hash: that would be circular, and the runtime adds its host block later).
The card names the hashes that identify the run instead: adapter files, spec, plan, lock,
base model files and data files.

The YAML header is written by hand: every value is a double-quoted YAML string with every
non-printable or non-ASCII character escaped, so no user string can break out of it.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

CARD_NAME = "README.md"
PLOT_NAME = "loss.svg"
HYPERPARAMETER_SECTIONS = ("quantization", "lora", "train", "data")
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


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def base_model_name(spec: dict[str, Any], model_input: dict[str, Any]) -> str:
    """The hub id when there is one, else the local directory as the spec names it."""
    return model_input.get("id") or spec["model"]["id"] or str(spec["model"]["path"])


def dataset_names(spec: dict[str, Any], data_input: dict[str, Any]) -> list[str]:
    if data_input.get("id") or spec["data"]["id"]:
        return [data_input.get("id") or spec["data"]["id"]]
    files = sorted(data_input.get("files") or {})
    return files or [Path(str(spec["data"]["path"])).name]


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


def hyperparameter_lines(spec: dict[str, Any]) -> list[str]:
    rows = []
    for section in HYPERPARAMETER_SECTIONS:
        for key, value in sorted(spec.get(section, {}).items()):
            shown = json.dumps(value, ensure_ascii=False) if not isinstance(value, str) else value
            rows.append((f"{section}.{key}", shown))
    return ["## Training setup", "", *table(("setting", "value"), rows)]


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
        lines += table(("metric", "value"), sorted(metrics.items()))
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


def provenance_lines(plan: dict[str, Any], manifest: dict[str, Any], adapter: Path) -> list[str]:
    predicate = manifest.get("predicate", {})
    inputs = predicate.get("inputs", {})
    model, data, run = inputs.get("model", {}), inputs.get("data", {}), predicate.get("run", {})
    spec_ref = predicate.get("spec") or {"name": plan["spec_name"], "sha256": plan["spec_sha256"]}
    adapter_files = {
        p.name: sha256_file(p)
        for p in sorted(adapter.iterdir())
        if p.is_file() and p.name not in (CARD_NAME, PLOT_NAME)
    }
    rows: list[tuple[Any, ...]] = [
        ("qlc version", predicate.get("qlc_version", plan["qlc_version"])),
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


def write_model_card(run_dir: Path, plan: dict[str, Any], manifest: dict[str, Any]) -> Path:
    """Write run_dir/adapter/README.md (and adapter/loss.svg when there are losses)."""
    adapter = Path(run_dir) / "adapter"
    spec, predicate = plan["spec"], manifest.get("predicate", {})
    inputs = predicate.get("inputs", {})
    base = base_model_name(spec, inputs.get("model", {}))
    header = yaml_header(
        {
            "base_model": base,
            "library_name": "peft",
            "datasets": dataset_names(spec, inputs.get("data", {})),
            "tags": ["qlora", "qlc", "lora", "peft", f"base_model:adapter:{base}"],
            "pipeline_tag": "text-generation",
        }
    )
    plot = write_loss_plot(read_metrics(Path(run_dir) / "metrics.jsonl"), adapter)
    body = [
        f"# {md(spec['job']['name'])}: a QLoRA adapter for {md(base)}",
        "",
        f"Trained by qlc {md(plan['qlc_version'])} from the spec {code(plan['spec_name'])} "
        f"(data format {code(spec['data']['format'])}).",
        "",
        *usage_lines(base),
        *hyperparameter_lines(spec),
        *data_report_lines(read_json(Path(run_dir) / "data_report.json")),
        *metrics_lines(predicate.get("metrics") or {}, plot),
        *provenance_lines(plan, manifest, adapter),
    ]
    card = adapter / CARD_NAME
    tmp = adapter / f".{CARD_NAME}.tmp"
    tmp.write_text(header + "\n" + "\n".join(body), encoding="utf-8")
    tmp.replace(card)
    return card
