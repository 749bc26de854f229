"""Greedy continuations of a prompt by the trained model: the run's sample.json, and the
generation `qlc generate` does with a run's adapter (prompts encoded as training encoded them)."""

from __future__ import annotations

from typing import Any

from qlc.trainer.examples import prompt_ids


def encode(tokenizer: Any, prompt: str, device: Any) -> dict[str, Any]:
    import torch

    ids = torch.tensor([prompt_ids(tokenizer, prompt)], device=device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def complete(model: Any, tokenizer: Any, prompt: str, new_tokens: int, **sampling: Any) -> str:
    """The model's continuation of `prompt` (greedy unless `sampling` says otherwise)."""
    import torch

    enc = encode(tokenizer, prompt, model.device)
    with torch.no_grad():
        ids = model.generate(
            **enc, max_new_tokens=new_tokens, pad_token_id=tokenizer.pad_token_id, **sampling
        )
    return str(tokenizer.decode(ids[0, enc["input_ids"].shape[1] :], skip_special_tokens=True))


def generate_sample(model: Any, tokenizer: Any, prompt: str, new_tokens: int) -> str:
    model.eval()
    model.config.use_cache = True
    return complete(model, tokenizer, prompt, new_tokens, do_sample=False)
