"""The fast engine: the plan's QLoRA mathematics without the library overheads.

What is the same as the reference engine (transformers Trainer + peft + bitsandbytes): the
examples of each optimizer step (batch_size x grad_accum x processes, the same seeded
length-grouped or random order), the number of steps, the learning-rate schedule and warmup
(transformers' get_scheduler), the optimizer the plan names, weight decay, clipping; the loss
(cross-entropy summed over the step's label tokens, divided by their count); the LoRA
mathematics, y = x W^T + dropout(x) A^T B^T * (alpha / r), with float32 adapter weights; and
the precision of every part, as plan.train.engine.precision names it.

What it does differently, and why it is the same function:
- padding-free batches (schedule.pack): a micro-batch's examples are one row; positions restart
  at every example and attention is causal within each example only (kernels.Attention);
- base_weights = "dequantized": the frozen 4-bit weights are dequantized ONCE by bitsandbytes'
  own dequantize_4bit into a copy in the base matmul dtype: the values bitsandbytes computes
  every matmul from; only the per-step dequantization is gone. "4bit" keeps them packed (a
  bitsandbytes matmul per use); "streamed" keeps them in host memory and copies one decoder
  layer at a time to the GPU (stream.WeightStream);
- one fused matmul for q|k|v and for gate|up (decoder.FastDecoder, proj.Proj);
- no host syncs in the loop: losses and norms are read back one logging step late
  (report.Reporter);
- activations kept or recomputed per layer as plan.train.engine.recompute says ("when-short":
  decided from the free GPU memory, recorded); the loss "full" or "chunked" (loss.HeadLoss).

What the decoder does not model (other architectures, tied embeddings, another activation,
DoRA, trained biases, modules_to_save, sliding windows shorter than an example) trains through
the model's own forward on padded batches (generic.GenericLoss): slower, never wrong, recorded.
"""

from qlc.trainer.fast.engine import train

__all__ = ["train"]
