"""Merge a run's LoRA adapter into full-precision base weights, and prove the merge.

The base is loaded in bf16 or fp16, never from its 4-bit weights: merging into quantized
weights rounds the LoRA update away (and re-quantizing loses more). Those weights are upcast
exactly to float32, W + scale * BA is computed in float32 and rounded once to the dtype.

Verification, in float32 arithmetic so only the merge itself is measured: the logits of base +
adapter (unmerged, from the dtype's weights) on a few held-out prompts are computed first; the
merged model is saved, loaded back from disk with plain transformers, and must agree:

    max |merged - reference| <= ATOL + RTOL[dtype] * max |reference|

RTOL is a few times what one rounding of every weight to the dtype costs (measured on the tiny
run: 0.6% of the largest logit in bf16, 0.12% in fp16). The adapter's own effect (base alone vs
base + adapter) is recorded beside it, so the record shows whether the check could tell a merge
from no merge. Everything is written to a sibling temporary directory renamed into place at
the end: a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlc import __version__
from qlc.contract import SAMPLE_FILE
from qlc.runtime.generate import (
    RunInputError,
    RunInputs,
    encode,
    hash_dir,
    load_model,
    load_tokenizer,
    open_run,
    render_prompt,
    with_adapter,
)
from qlc.userio import clip, output_problem

RTOL = {"bf16": 2e-2, "fp16": 4e-3}  # a few units of each format's rounding (2^-8, 2^-11)
ATOL = 1e-3
DTYPES = ("bf16", "fp16")
MAX_SHARD_SIZE = "4GB"
RECORD = "merge.json"
FALLBACK_PROMPTS = ("Tell me about the sea.", "What is 2 + 2?", "Write a short poem.")


class MergeVerificationError(Exception):
    """The merged model's logits do not match base + adapter: nothing was written."""


@dataclass(frozen=True)
class MergeRecord:
    output_dir: str
    source_manifest_sha256: str
    base_model: dict[str, Any]
    dtype: str
    tolerance: dict[str, Any]
    max_abs_diff: float
    reference_max_abs: float
    adapter_effect_max_abs: float
    adapter_effect_detectable: bool  # the effect exceeds the bound: the check means something
    prompts: int
    files: dict[str, str]
    qlc_version: str
    created_at: str


def torch_dtype(name: str) -> Any:
    import torch

    if name not in DTYPES:
        raise RunInputError(f"--dtype must be one of {', '.join(DTYPES)} (got {name!r})")
    return torch.bfloat16 if name == "bf16" else torch.float16


def held_out_prompts(inputs: RunInputs, tokenizer: Any) -> list[str]:
    """The run's held-out sample prompt (already rendered) plus fixed prompts rendered alike."""
    rendered = []
    sample = inputs.run_dir / SAMPLE_FILE
    if sample.is_file():
        prompt = json.loads(sample.read_text(encoding="utf-8")).get("prompt")
        if isinstance(prompt, str) and prompt:
            rendered.append(prompt)
    rendered += [render_prompt(inputs.plan, p, tokenizer) for p in FALLBACK_PROMPTS]
    return rendered


def logits_of(model: Any, encoded: list[dict[str, Any]]) -> list[Any]:
    import torch

    with torch.no_grad():
        return [
            model(**{k: v.to(model.device) for k, v in enc.items()}).logits.float().cpu()
            for enc in encoded
        ]


def max_abs_diff(a: list[Any], b: list[Any]) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True))


def move_into_place(staging: Path, output_dir: Path) -> None:
    """The finished staging folder becomes output_dir (an empty one, as prepare_output
    allowed, is replaced)."""
    if output_dir.exists():
        output_dir.rmdir()
    os.replace(staging, output_dir)


def prepare_output(output_dir: Path) -> Path:
    """A new staging directory beside output_dir, once output_dir is free to take; a
    RunInputError naming the path and the fix when it is not (taken, or not writable)."""
    try:
        target = output_dir.resolve()
        if os.path.lexists(target) and (not target.is_dir() or any(target.iterdir())):
            raise RunInputError(
                f"error: -o {clip(str(output_dir), 200)}: exists and is not empty: "
                "choose a new directory with -o"
            )
        target.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix=f".{target.name}.qlc-merge-", dir=target.parent))
    except OSError as error:
        raise RunInputError(f"error: {output_problem(output_dir, error)}") from None


def merge_into(inputs: RunInputs, staging: Path, dtype: str) -> tuple[float, float, float, int]:
    """Save the merged model to staging; (max diff, reference max, adapter effect, prompts)."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(inputs)
    encoded = [encode(p, tokenizer) for p in held_out_prompts(inputs, tokenizer)]
    weights = torch_dtype(dtype)
    base = load_model(inputs, dtype=weights).float()  # exact upcast
    model = with_adapter(base, inputs)
    reference = logits_of(model, encoded)
    with model.disable_adapter():
        effect = max_abs_diff(logits_of(model, encoded), reference)
    merged = model.merge_and_unload().to(weights)  # W + BA in float32, rounded once
    merged.save_pretrained(staging, max_shard_size=MAX_SHARD_SIZE)
    tokenizer.save_pretrained(staging)
    del model, merged, base
    gc.collect()
    torch.cuda.empty_cache()
    device_map = {"": 0} if torch.cuda.is_available() else None
    reloaded: Any = AutoModelForCausalLM.from_pretrained(
        staging, dtype=weights, device_map=device_map
    )
    reloaded = reloaded.float().eval()
    measured = max_abs_diff(logits_of(reloaded, encoded), reference)
    reference_max = max(float(r.abs().max()) for r in reference)
    return measured, reference_max, effect, len(encoded)


def merge(
    run: Path, output_dir: Path, dtype: str = "bf16", base_model_path: Path | None = None
) -> MergeRecord:
    """Merge the run's adapter into its base in `dtype`, verify, write output_dir atomically."""
    torch_dtype(dtype)
    staging = prepare_output(Path(output_dir))  # before minutes of loading
    try:
        inputs = open_run(Path(run), base_model_path)
        measured, reference_max, effect, prompts = merge_into(inputs, staging, dtype)
        bound = ATOL + RTOL[dtype] * reference_max
        if not measured <= bound:
            raise MergeVerificationError(
                f"merged logits differ from base + adapter by {measured:.4g} (allowed "
                f"{bound:.4g} in {dtype}): the merge is wrong; nothing was written"
            )
        record = MergeRecord(
            output_dir=str(Path(output_dir).resolve()),
            source_manifest_sha256=inputs.manifest_sha256,
            base_model={"source": inputs.base.source, "revision": inputs.base.revision},
            dtype=dtype,
            tolerance={
                "rule": "max|merged - reference| <= atol + rtol * max|reference| (logits)",
                "atol": ATOL,
                "rtol": RTOL[dtype],
                "bound": bound,
            },
            max_abs_diff=measured,
            reference_max_abs=reference_max,
            adapter_effect_max_abs=effect,
            adapter_effect_detectable=effect > bound,
            prompts=prompts,
            files=hash_dir(staging),
            qlc_version=__version__,
            created_at=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        text = json.dumps(asdict(record), indent=2, sort_keys=True) + "\n"
        (staging / RECORD).write_text(text, encoding="utf-8")
        move_into_place(staging, Path(output_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record
