"""Prove a GGUF is the merged model: llama.cpp loads it, tokenizes as HF does, agrees on logits.

Three checks, every number kept for the merge record:
1. Metadata: the GGUF carries the training chat template (tokenizer.chat_template) and the
   special tokens (BOS, EOS ids) of the HF tokenizer the run trained with.
2. Tokens: llama.cpp (through llama-cpp-python) tokenizes each held-out prompt, rendered with
   the training template, and a probe text (whitespace runs, digits, contractions, non-Latin
   scripts, emoji) into exactly the ids the HF tokenizer gives, BOS added as the GGUF says.
3. Logits: on the token ids training would have fed (generate.encode), llama.cpp's logits and
   the merged HF model's (its weights upcast to float32) differ by at most

       max |gguf - merged| <= ATOL + RTOL[quant] * max |merged|

   and their mean difference by at most MEAN_RTOL[quant] * max |merged|; both per
   quantization, from measurements on the tiny run (see RTOL below).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ATOL = 1e-3
# Bounds from measurements on two tiny runs (2-layer Llama, hidden 64, vocab 1024, learning
# rate 5e-2: large adapter updates), llama-cpp-python 0.3.36 on x86-64 CPU, 16 prompts each
# (the held-out ones and 12 training rows), as  max|gguf - merged| / max|merged|  and
# mean|gguf - merged| / max|merged|:
#   text run, bf16 merge (max|merged| 3.78):  f16 4.4e-4 / 5.5e-5   q8_0 0.041 / 2.1e-3
#                                             q4_k_m 0.236 / 4.3e-3 (top-1 agreement 99.3%)
#   chat run, fp16 merge (max|merged| 7.38):  f16 8.0e-3 / 1.4e-4   q8_0 0.145 / 3.6e-3
#                                             q4_k_m 1.31 / 0.021 (top-1 agreement 75%)
# Each bound is about 3x the larger measurement. For q4_k_m the max bound says nothing (a
# few logits of that run moved by more than max|merged|); its mean bound is the check. On
# the tiny model q4_k_m is mostly fallback types (rows of 64 are not a multiple of the
# k-quants' 256: llama.cpp uses q5_0/q8_0 for 15 of 21 tensors). A wrong tokenizer, template
# or tensor moves every logit, which the mean bound catches; the adapter's own effect on the
# logits (adapter_effect_max_abs, from the HF merge) is recorded beside for scale.
RTOL = {"f16": 2.5e-2, "q8_0": 4.5e-1, "q4_k_m": 4.0}
MEAN_RTOL = {"f16": 4e-4, "q8_0": 1.1e-2, "q4_k_m": 6.5e-2}
PROBE = (
    "\n \n\n \t\t x  y   z\n3 33 333 3333 3.14 1,000,000 -----=====\n"
    "I've been 'told he's there, 'RE you sure? We'Ve a'lL DONE it!!! ...?\n"
    "Größe café naïve Ελληνικά русский 日本語 中文 한국어 😀🦙 ✅ ``` \"\"\" '''"
)


@dataclass
class GgufCheck:
    quant: str
    metadata: dict[str, Any] = field(default_factory=dict)
    token_texts: int = 0
    token_mismatches: list[str] = field(default_factory=list)
    prompts: int = 0
    max_abs_diff: float = 0.0
    mean_abs_diff: float = 0.0
    reference_max_abs: float = 0.0
    top1_agreement: float = 0.0
    adapter_effect_max_abs: float | None = None
    tolerance: dict[str, Any] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def load_llama(path: Path, n_ctx: int) -> Any:
    from llama_cpp import Llama

    threads = os.cpu_count() or 1
    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=n_ctx,
        n_ubatch=n_ctx,
        logits_all=True,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )


def check_metadata(llm: Any, tokenizer: Any, check: GgufCheck) -> bool:
    """The template and special tokens in the GGUF; True when BOS is added by the GGUF."""
    meta = dict(llm.metadata)
    add_bos = str(meta.get("tokenizer.ggml.add_bos_token", "false")).lower() == "true"
    template = getattr(tokenizer, "chat_template", None)
    kept = meta.get("tokenizer.chat_template")
    check.metadata = {
        "chat_template_kept": template is None or kept == template,
        "bos_token_id": meta.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": meta.get("tokenizer.ggml.eos_token_id"),
        "add_bos_token": add_bos,
        "pre_tokenizer": meta.get("tokenizer.ggml.pre"),
    }
    if template is not None and kept != template:
        check.problems.append("the GGUF does not carry the training chat template")
    for name, hf_id in (("bos", tokenizer.bos_token_id), ("eos", tokenizer.eos_token_id)):
        found = meta.get(f"tokenizer.ggml.{name}_token_id")
        if hf_id is not None and str(found) != str(hf_id):
            check.problems.append(f"{name.upper()} token id {found} in the GGUF, {hf_id} in HF")
    return add_bos


def check_tokens(
    llm: Any, tokenizer: Any, texts: list[str], add_bos: bool, check: GgufCheck
) -> None:
    for text in [*texts, PROBE]:
        ours = list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))
        theirs = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        check.token_texts += 1
        if ours != theirs:
            first = next(
                (i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b),
                min(len(ours), len(theirs)),
            )
            check.token_mismatches.append(
                f"{text[:40]!r}...: llama.cpp {ours[first : first + 5]} vs HF "
                f"{theirs[first : first + 5]} at token {first}"
            )
    if check.token_mismatches:
        check.problems.append(
            f"llama.cpp tokenizes {len(check.token_mismatches)} of {check.token_texts} texts "
            f"differently from the HF tokenizer: {check.token_mismatches[0]}"
        )


def gguf_logits(llm: Any, ids: list[int]) -> Any:
    import numpy as np

    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[: len(ids)], dtype=np.float32)


def hf_logits(model: Any, ids: list[int]) -> Any:
    import torch

    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids])).logits[0].float()
    return out.numpy()


def check_logits(llm: Any, model: Any, encoded: list[list[int]], check: GgufCheck) -> None:
    import numpy as np

    diffs, agree, total, reference_max = [], 0, 0, 0.0
    for ids in encoded:
        ours, theirs = gguf_logits(llm, ids), hf_logits(model, ids)
        diffs.append(np.abs(ours - theirs))
        reference_max = max(reference_max, float(np.abs(theirs).max()))
        agree += int((ours.argmax(-1) == theirs.argmax(-1)).sum())
        total += len(ids)
    check.prompts = len(encoded)
    check.max_abs_diff = float(max(d.max() for d in diffs))
    check.mean_abs_diff = float(np.concatenate([d.ravel() for d in diffs]).mean())
    check.reference_max_abs = reference_max
    check.top1_agreement = agree / total
    bound = ATOL + RTOL[check.quant] * reference_max
    mean_bound = MEAN_RTOL[check.quant] * reference_max
    check.tolerance = {
        "rule": "max|gguf - merged| <= atol + rtol * max|merged| and "
        "mean|gguf - merged| <= mean_rtol * max|merged| (logits, float32)",
        "atol": ATOL,
        "rtol": RTOL[check.quant],
        "mean_rtol": MEAN_RTOL[check.quant],
        "bound": bound,
        "mean_bound": mean_bound,
    }
    if not (check.max_abs_diff <= bound and check.mean_abs_diff <= mean_bound):
        check.problems.append(
            f"llama.cpp's logits differ from the merged model's by {check.max_abs_diff:.4g} "
            f"at most and {check.mean_abs_diff:.4g} on average (allowed {bound:.4g} and "
            f"{mean_bound:.4g} for {check.quant})"
        )


def verify_gguf(
    gguf: Path, merged_dir: Path, quant: str, texts: list[str], encoded: list[list[int]]
) -> GgufCheck:
    """All three checks of `gguf` against the HF model in merged_dir (weights in its dtype)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    check = GgufCheck(quant)
    tokenizer = AutoTokenizer.from_pretrained(str(merged_dir))
    longest = max(len(ids) for ids in encoded)
    llm = load_llama(gguf, n_ctx=max(64, longest + 16))
    try:
        add_bos = check_metadata(llm, tokenizer, check)
        check_tokens(llm, tokenizer, texts, add_bos, check)
        model: Any = AutoModelForCausalLM.from_pretrained(str(merged_dir))
        model = model.float().eval()
        check_logits(llm, model, encoded, check)
    finally:
        llm.close()
    return check
