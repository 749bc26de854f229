"""QLoRA fine-tuning of "model", compiled by qlc "0.1.0".

spec:   "specs/instruction.toml"
sha256: "9d17d55307fe7fecdba884bb70b6a01b452723f93afbdf232772f10d9f36c340"
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
    "memory": "standard",  # train.memory
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
    "quant_type": "nf4",  # quantization.quant_type
    "double_quant": False,  # quantization.double_quant
    "storage_dtype": "uint8",  # quantization.storage_dtype
    "lora_r": 16,  # lora.r
    "lora_alpha": 16.0,  # lora.alpha
    "lora_scale": 1.0,  # lora.alpha / lora.r
    "lora_dropout": 0.1,  # lora.dropout
    "lora_bias": "none",  # lora.bias
    # lora.target_modules
    "lora_targets": ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"],
    "optimizer": "paged_adamw_32bit",  # train.optimizer, train.memory
    "optimizer_state_bits": 32,  # train.optimizer, train.memory
    "optimizer_paged": True,  # train.optimizer
    "learning_rate": 0.0001,  # train.learning_rate
    "weight_decay": 0.0,  # train.weight_decay
    "max_grad_norm": 1.0,  # train.max_grad_norm (0: none)
    "lr_scheduler": "linear",  # train.lr_scheduler
    "warmup": "5 steps",  # train.warmup_steps / train.warmup_ratio
    "steps": "2 epoch(s)",  # train.max_steps / train.epochs
    "batch_size": 8,  # train.batch_size
    "grad_accum": 1,  # train.grad_accum / train.examples_per_step
    "world_size": 1,  # runtime.gpus (1 process on CPU)
    "examples_per_step": 8,  # batch_size x grad_accum x world_size
    "group_by_length": True,  # train.group_by_length
    "data_format": "instruction",  # data.format
    "data_source_weights": None,  # data.sources[*].weight
    "chat_template": None,  # data.chat_template(_file), else the tokenizer's
    "loss_on": "completion",  # data.loss
    "max_length": 256,  # data.max_length
    "packing": False,  # data.packing
    "eval_metric": "token-weighted cross-entropy",  # data.eval_split / data.eval_fraction
    "seed": 11,  # job.seed
    "deterministic": False,  # job.deterministic
    # track.tensorboard, track.wandb, track.mlflow
    "trackers": ["tensorboard: <run dir>/tensorboard"],
}


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
