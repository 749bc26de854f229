"""QLoRA fine-tuning of "org/some-model", compiled by qlc "0.1.0".

spec:   "tests/golden/contexts/edge-all-settings/spec.toml"
sha256: "725ad67c6afb348a471200338cbf9d00b9812c684b82a5aa308d771bcdd14a90"
engine: "reference", "trl SFTTrainer (transformers Trainer, peft, bitsandbytes)"

Rerun it: `python train.py` with plan.json beside it (or QLC_PLAN=/path/to/plan.json); the run
directory is $QLC_OUTPUT_DIR (default ./out). The settings below are the plan's, written out to
be read: plan.json holds them all and the trainer refuses to start if these lines differ from it.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the trainer package shipped here

from qlc.trainer.recipe import Run

# What will run, each from the spec key named beside it.
SETTINGS = {
    "engine": "reference",  # train.engine
    "memory": "lean",  # train.memory
    # train.engine, train.memory
    "path": "trl SFTTrainer (transformers Trainer, peft, bitsandbytes)",
    "batches": "padded",  # train.engine
    "base_weights": "4bit",  # train.engine, train.memory, runtime.gpus
    "recompute": "every-layer",  # train.gradient_checkpointing, train.memory
    "attention": "the model's SDPA on padded batches",  # train.engine
    "loss": "full",  # train.memory
    "distributed": "ddp",  # runtime.distributed (with several processes)
    "base_matmul_dtype": "bfloat16",  # quantization.compute_dtype
    "adapter_weights_dtype": "float32",  # peft (LoRA weights in float32)
    "adapter_compute_dtype": "bfloat16",  # train.mixed_precision
    "activations_dtype": "float32",  # train.engine, quantization.compute_dtype
    "logits_dtype": "float32",  # the loss in float32
    "load_in_4bit": True,  # quantization.load_in_4bit
    "quant_type": "fp4",  # quantization.quant_type
    "double_quant": True,  # quantization.double_quant
    "storage_dtype": "bfloat16",  # quantization.storage_dtype
    "lora_r": 16,  # lora.r
    "lora_alpha": 32.0,  # lora.alpha
    "lora_scale": 2.0,  # lora.alpha / lora.r
    "lora_dropout": 0.05,  # lora.dropout
    "lora_bias": "lora_only",  # lora.bias
    "lora_targets": "all-linear",  # lora.target_modules
    "optimizer": "paged_adamw_8bit",  # train.optimizer, train.memory
    "optimizer_state_bits": 8,  # train.optimizer, train.memory
    "optimizer_paged": True,  # train.optimizer
    "learning_rate": 0.0001,  # train.learning_rate
    "weight_decay": 0.01,  # train.weight_decay
    "max_grad_norm": 1.0,  # train.max_grad_norm (0: none)
    "lr_scheduler": "linear",  # train.lr_scheduler
    "warmup": "20 steps",  # train.warmup_steps / train.warmup_ratio
    "steps": "500 steps",  # train.max_steps / train.epochs
    "batch_size": 2,  # train.batch_size
    "grad_accum": 8,  # train.grad_accum / train.examples_per_step
    "world_size": 2,  # runtime.gpus (1 process on CPU)
    "examples_per_step": 32,  # batch_size x grad_accum x world_size
    "group_by_length": True,  # train.group_by_length
    "data_format": "chat",  # data.format
    "data_source_weights": None,  # data.sources[*].weight
    "chat_template": "the tokenizer's",  # data.chat_template(_file), else the tokenizer's
    "loss_on": "completion",  # data.loss
    "max_length": 4096,  # data.max_length
    "packing": True,  # data.packing
    "eval_metric": "token-weighted cross-entropy",  # data.eval_split / data.eval_fraction
    "seed": 7,  # job.seed
    "deterministic": True,  # job.deterministic
    # track.tensorboard, track.wandb, track.mlflow
    "trackers": ["tensorboard: <run dir>/tensorboard"],
}
# Substitutions (asked for by the spec):
#   train.gradient_checkpointing: false -> true
#     (train.memory = "lean" recomputes every decoder layer in the backward pass)


def main() -> int:
    run = Run.start(__file__, SETTINGS)  # plan.json, run directory, manifest; torchrun if several
    if run.launched:  # torchrun ran this script once per process; rank 0 wrote the records
        return run.code
    with run:  # the outcome goes into the manifest, whatever happens
        data = run.prepare_data()  # rows -> rendered, tokenized examples (checked first)
        model = run.load_model(data)  # the 4-bit base and LoRA, as the settings say
        result = run.train(model, data)  # the engine named above
        run.save(model, data, result)  # adapter, model card, sample, metrics
    return run.code


if __name__ == "__main__":
    sys.exit(main())
