"""The seed recipe, as the article in shared/seed and shared/BENCHMARK.md describe it.

    python bench/seed_recipe.py --model DIR --data PARQUET --out RUN_DIR [--max-steps N] [--cpu]

Plain transformers + peft + bitsandbytes + trl: Llama-2-7b-chat shape loaded 4-bit NF4 with
float16 compute and no double quantization; LoRA r 64, alpha 16, dropout 0.1, bias none, peft's
default targets (q_proj, v_proj); 1 epoch, batch 4, grad accumulation 1, lr 2e-4 cosine, warmup
3%, weight decay 0.001, paged_adamw_32bit, max grad norm 0.3, group by length, gradient
checkpointing, max length 1,024, no packing, field "text".

What the benchmark adds, none of which changes the training mathematics:
- the rows are split as qlc's train.py splits them for data.eval_fraction = 0.05 (seed 42:
  `random.Random(42).shuffle` of the row indices, the first 50 held out), so that every
  pipeline trains on the same 950 rows and is scored on the same 50;
- logging_steps = 1 (the article logs every 25 steps) so that the mean loss of the last 10% of
  steps can be computed from the log; no checkpoints are written (save_steps = 0 in the article);
- after training: the held-out loss (token-weighted mean cross-entropy, dropout off, the rows
  tokenized as the trainer tokenized its training rows) and one JSON line of figures.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

EVAL_FRACTION, SEED = 0.05, 42


def split_rows(rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """train.py's held-out split for eval_fraction = 0.05, seed 42."""
    order = list(range(len(rows)))
    random.Random(SEED).shuffle(order)
    held = set(order[: max(1, round(len(rows) * EVAL_FRACTION))])
    return [r for i, r in enumerate(rows) if i not in held], [rows[i] for i in sorted(held)]


def sft_config(args: argparse.Namespace, out: Path):
    import dataclasses

    from trl import SFTConfig

    names = {f.name for f in dataclasses.fields(SFTConfig)}
    grouping = (
        {"group_by_length": True}
        if "group_by_length" in names
        else {"train_sampling_strategy": "group_by_length"}
    )
    return SFTConfig(
        output_dir=str(out / "results"),
        num_train_epochs=1,
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        gradient_accumulation_steps=1,
        optim="paged_adamw_32bit" if not args.cpu else "adamw_torch",
        save_strategy="no",
        logging_steps=1,
        learning_rate=2e-4,
        weight_decay=0.001,
        fp16=False,
        bf16=False,
        max_grad_norm=0.3,
        warmup_steps=0.03,  # transformers 5: a float below 1 is a ratio (was warmup_ratio=0.03)
        lr_scheduler_type="cosine",
        gradient_checkpointing=True,
        report_to="none",
        dataset_text_field="text",
        max_length=1024,
        packing=False,
        seed=SEED,
        use_cpu=args.cpu,
        disable_tqdm=True,
        **grouping,
    )


def load(args: argparse.Namespace):
    import torch
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    compute = torch.float32 if args.cpu else torch.float16
    bnb_config = BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_use_double_quant=False,
    )
    model = AutoModelForCausalLM.from_pretrained(
        args.model, quantization_config=bnb_config, device_map="cpu" if args.cpu else {"": 0}
    )
    model.config.use_cache = False
    model.config.pretraining_tp = 1
    tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=True)
    tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    peft_config = LoraConfig(
        lora_alpha=16, lora_dropout=0.1, r=64, bias="none", task_type="CAUSAL_LM"
    )
    return model, tokenizer, peft_config


def heldout_loss(model, tokenizer, rows: list[dict], device) -> float:
    """Token-weighted cross-entropy on the held-out rows, tokenized as trl tokenized training."""
    import torch
    import torch.nn.functional as F

    eos = tokenizer.eos_token
    texts = [r["text"] if r["text"].endswith(eos) else r["text"] + eos for r in rows]
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), 4):
            enc = tokenizer(
                texts[start : start + 4],
                truncation=True,
                max_length=1024,
                padding=True,
                return_tensors="pt",
            ).to(device)
            logits = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits
            labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
            shifted = F.pad(labels[:, 1:], (0, 1), value=-100)
            total += float(
                F.cross_entropy(
                    logits.float().flatten(0, 1),
                    shifted.flatten(),
                    ignore_index=-100,
                    reduction="sum",
                )
            )
            count += int((shifted != -100).sum())
    return total / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--max-steps", type=int, default=-1)
    parser.add_argument("--cpu", action="store_true")
    args = parser.parse_args()

    import pyarrow.parquet as pq
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTTrainer

    started = time.perf_counter()
    train_rows, eval_rows = split_rows(pq.read_table(args.data).to_pylist())
    model, tokenizer, peft_config = load(args)
    first_step: list[float] = []

    class FirstStep(TrainerCallback):
        def on_step_end(self, *a, **kw):
            if not first_step:
                first_step.append(time.perf_counter())

    trainer = SFTTrainer(
        model=model,
        train_dataset=Dataset.from_list(train_rows),
        peft_config=peft_config,
        processing_class=tokenizer,
        args=sft_config(args, args.out),
        callbacks=[FirstStep()],
    )
    train_start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - train_start
    cuda = torch.cuda.is_available() and not args.cpu
    peak = (
        {
            "peak_allocated": torch.cuda.max_memory_allocated(),
            "peak_reserved": torch.cuda.max_memory_reserved(),
        }
        if cuda
        else {}
    )
    steps = trainer.state.global_step
    tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    tokens = tokens * steps // max(1, len(trainer.get_train_dataloader()))
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    heldout = heldout_loss(trainer.model, tokenizer, eval_rows, trainer.model.device)
    record = {
        "train_seconds": seconds,
        "hf_train_runtime": result.metrics.get("train_runtime"),
        "tokens_trained": tokens,
        "tokens_per_s": tokens / seconds,
        "steps": steps,
        "time_to_first_step_s": first_step[0] - train_start if first_step else None,
        "step_losses": losses,
        "eval_loss": heldout,
        "wall_s": time.perf_counter() - started,
        **peak,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "seed_metrics.json").write_text(json.dumps(record))
    print("SEED_METRICS " + json.dumps({k: v for k, v in record.items() if k != "step_losses"}))


if __name__ == "__main__":
    main()
