"""`qlc merge RUN --format gguf --quant Q`: the verified merge, as a verified GGUF for llama.cpp.

Order: the quantization is checked and the run verified (open_run) before anything is made;
then the HF merge (runtime/merge.py: logits checked against base + adapter) goes into a
staging directory beside the output, llama.cpp's converter (and for k-quants its quantizer)
makes the GGUF from it, gguf_verify proves the GGUF against that merge (metadata, tokens,
logits), an Ollama Modelfile is written with the training template, and merge.json records
the numbers. Only then is the staging directory (GGUF, Modelfile, merge.json; the HF merge is
left out) renamed into place: a failure at any step leaves nothing behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from qlc import __version__
from qlc.contract import json_bytes, sha256_file
from qlc.runtime.generate import (
    RunInputError,
    encode,
    load_tokenizer,
    open_run,
    render_prompt,
)
from qlc.runtime.gguf_tools import LLAMA_CPP_PYTHON, QUANTS, SDIST_SHA256, Quant, make_gguf
from qlc.runtime.gguf_verify import GgufCheck, verify_gguf
from qlc.runtime.merge import FALLBACK_PROMPTS, held_out_prompts, merge, move_into_place
from qlc.runtime.modelfile import (
    check_template,
    derive_template,
    modelfile_text,
    stop_tokens,
)

RECORD = "merge.json"
MODELFILE = "Modelfile"
STAGED_MERGE = "hf-merge"
FALLBACK_MARK = "unknown BPE pre-tokenizer hash"


class GgufVerificationError(Exception):
    """The GGUF does not match the merged model (tokens, metadata or logits): nothing written."""


def quant_of(name: str) -> Quant:
    if name not in QUANTS:
        raise RunInputError(f"--quant must be one of {', '.join(QUANTS)} (got {name!r})")
    return QUANTS[name]


def staging_beside(output_dir: Path) -> Path:
    output_dir = output_dir.resolve()
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())):
        raise RunInputError(f"{output_dir} exists and is not empty: choose a new directory")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.qlc-gguf-", dir=output_dir.parent))


def assistant_end(tokenizer: Any) -> str:
    """What the chat template writes after an assistant's answer ("" without a template)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return ""
    marker = "QLC\u2063END"
    messages = [{"role": "user", "content": "u"}, {"role": "assistant", "content": marker}]
    text = str(tokenizer.apply_chat_template(messages, tokenize=False))
    return text.split(marker, 1)[1] if marker in text else ""


def write_modelfile(staging: Path, gguf_name: str, inputs: Any, check: GgufCheck) -> dict[str, Any]:
    tokenizer = load_tokenizer(inputs)
    render = lambda prompt: render_prompt(inputs.plan, prompt, tokenizer)  # noqa: E731
    bos = tokenizer.bos_token
    template = derive_template(render, bos, bool(check.metadata.get("add_bos_token")))
    check_template(template, render, list(FALLBACK_PROMPTS), bos or "")
    special = [str(t) for t in tokenizer.all_special_tokens]
    stops = stop_tokens(tokenizer.eos_token, assistant_end(tokenizer), special)
    (staging / MODELFILE).write_text(modelfile_text(gguf_name, template, stops), "utf-8")
    return {
        "template": template.go_template(),
        "stop": stops,
        "bos_left_to_llama_cpp": template.dropped_bos,
    }


def prompts_and_ids(inputs: Any) -> tuple[list[str], list[list[int]]]:
    tokenizer = load_tokenizer(inputs)
    texts = held_out_prompts(inputs, tokenizer)
    return texts, [encode(text, tokenizer)["input_ids"][0].tolist() for text in texts]


def gguf_record(
    merged: Any, quant: Quant, gguf: Path, log: str, check: GgufCheck, modelfile: dict[str, Any]
) -> dict[str, Any]:
    hf_merge = {k: v for k, v in asdict(merged).items() if k not in ("output_dir", "files")}
    return {
        "format": "gguf",
        "quant": quant.name,
        "gguf": {"file": gguf.name, "sha256": sha256_file(gguf), "bytes": gguf.stat().st_size},
        "converter": {
            "llama_cpp_python": LLAMA_CPP_PYTHON,
            "sdist_sha256": SDIST_SHA256,
            "pre_tokenizer_from_config": FALLBACK_MARK in log,
        },
        "verification": asdict(check),
        "modelfile": modelfile,
        "hf_merge": hf_merge,
        "source_manifest_sha256": merged.source_manifest_sha256,
        "qlc_version": __version__,
        "created_at": datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


def merge_gguf(
    run: Path,
    output_dir: Path,
    quant: str = "q8_0",
    dtype: str = "bf16",
    base_model_path: Path | None = None,
) -> dict[str, Any]:
    """Merge, convert, verify, write output_dir atomically; the merge record."""
    chosen = quant_of(quant)
    inputs = open_run(Path(run), base_model_path)
    staging = staging_beside(Path(output_dir))
    try:
        merged = merge(inputs.run_dir, staging / STAGED_MERGE, dtype, base_model_path)
        gguf = staging / f"model-{chosen.name}.gguf"
        log = make_gguf(staging / STAGED_MERGE, gguf, chosen, dtype)
        texts, encoded = prompts_and_ids(inputs)
        check = verify_gguf(gguf, staging / STAGED_MERGE, chosen.name, texts, encoded)
        check.adapter_effect_max_abs = merged.adapter_effect_max_abs
        if not check.ok:
            raise GgufVerificationError("; ".join(check.problems) + "; nothing was written")
        modelfile = write_modelfile(staging, gguf.name, inputs, check)
        shutil.rmtree(staging / STAGED_MERGE)
        record = gguf_record(merged, chosen, gguf, log, check, modelfile)
        record["files"] = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        (staging / RECORD).write_bytes(json_bytes(record))
        move_into_place(staging, Path(output_dir))
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return record


def read_record(output_dir: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((output_dir / RECORD).read_text(encoding="utf-8"))
    return data
