"""The tokenizer and the model: the base loaded in 4 bits through bitsandbytes as the plan says,
LoRA adapters through peft; and the smoke mode's tiny model of the same architecture."""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qlc.compiler.plan import TEMPLATE_KEY, LoraPlan, ModelPlan, Plan, QuantizationPlan
from qlc.trainer.errors import UserError
from qlc.trainer.formats import SMOKE_CHAT_TEMPLATE

SMOKE_VOCAB = 512
SMOKE_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": SMOKE_VOCAB,
    "max_position_embeddings": 2048,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "tie_word_embeddings": False,
}
# model.architecture -> (config model_type, what its tiny model adds to SMOKE_SHAPE): the
# features that set the architecture apart, so a smoke run exercises them.
SMOKE_ARCHITECTURES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3": ("llama", {"rope_parameters": {
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 256}}),
    "mistral": ("mistral", {"sliding_window": None}),
    "qwen2": ("qwen2", {"tie_word_embeddings": True}),  # Qwen 2.5's small models tie them
    "qwen3": ("qwen3", {"head_dim": 32, "tie_word_embeddings": True}),
    "gemma2": ("gemma2", {"head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 16,
                          "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                          "tie_word_embeddings": True, "pad_token_id": 0}),
    "gemma3": ("gemma3_text", {"head_dim": 32, "query_pre_attn_scalar": 32,
                               "sliding_window": 16, "tie_word_embeddings": True,
                               "layer_types": ["sliding_attention", "full_attention"],
                               "pad_token_id": 0}),
    "phi3": ("phi3", {"pad_token_id": 0}),  # fused qkv_proj and gate_up_proj
}  # fmt: skip


@dataclass(frozen=True)
class ModelSource:
    """Where the base model is read from: a local directory, or a hub id at a revision."""

    path_or_id: str
    revision: str | None
    local: bool


def model_source(model: ModelPlan, override: str | None) -> ModelSource:
    path = override or model.local_path
    if path is not None:
        if not Path(path, "config.json").is_file():
            raise UserError(
                f"model directory {path!r} has no config.json (relative paths start at "
                f"{Path.cwd()}; the runtime passes the spec's model.path)"
            )
        check_model_type(model, config_model_type(path), f"{path}/config.json")
        return ModelSource(path, None, local=True)
    return ModelSource(model.hub_id or "", model.revision, local=False)


def torch_dtype(name: str) -> Any:
    import torch

    return {
        "float16": torch.float16,
        "bfloat16": torch.bfloat16,
        "float32": torch.float32,
        "uint8": torch.uint8,
    }[name]


def bnb_config(quant: QuantizationPlan) -> Any:
    """BitsAndBytesConfig for 4-bit loading, or None when the plan loads full weights."""
    from transformers import BitsAndBytesConfig

    if not quant.load_in_4bit:
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=quant.quant_type,
        bnb_4bit_compute_dtype=torch_dtype(quant.compute_dtype),
        bnb_4bit_use_double_quant=quant.double_quant,
        bnb_4bit_quant_storage=torch_dtype(quant.storage_dtype),
    )


def lora_config(lora: LoraPlan) -> Any:
    from peft import LoraConfig

    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        bias=lora.bias,
        target_modules=lora.target_modules,
        modules_to_save=lora.modules_to_save or None,
        task_type="CAUSAL_LM",
    )


def hub_failure(what: str, error: BaseException) -> UserError:
    lines = str(error).strip().splitlines()
    first = lines[0][:300] if lines else type(error).__name__
    return UserError(
        f"cannot load {what} from the Hugging Face hub: {type(error).__name__}: {first}\n"
        "fix: check the id and your access (HF_TOKEN as a runtime.secrets name), or use a "
        "local directory as model.path"
    )


def chat_template_of(plan: Plan, input_paths: Mapping[str, str] | None) -> str | None:
    """The chat template the spec asks for instead of the tokenizer's: data.chat_template, or
    the text of data.chat_template_file (where the launch path says it is; None: neither)."""
    data = plan.data
    inline: str | None = data.chat_template
    if data.chat_template_file is None:
        return inline
    path: str = (input_paths or {}).get(TEMPLATE_KEY) or data.chat_template_file
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UserError(
            f"chat template file {path!r}: cannot read it ({error.strerror}; relative paths "
            f"start at {Path.cwd()}; the runtime passes the spec's data.chat_template_file)"
        ) from None
    except UnicodeDecodeError:
        raise UserError(f"chat template file {path!r} is not UTF-8 text") from None


def load_tokenizer(
    plan: Plan, source: ModelSource, input_paths: Mapping[str, str] | None = None
) -> Any:
    from transformers import AutoTokenizer

    override = plan.model.tokenizer
    name = override or source.path_or_id
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            name,
            revision=None if override else source.revision,
            token=os.environ.get("HF_TOKEN") or None,
            trust_remote_code=plan.model.trust_remote_code,
        )
    except (OSError, ValueError) as error:  # transformers 5: ValueError without tokenizer files
        if source.local and not override:
            lines = str(error).strip().splitlines()
            raise UserError(
                f"cannot load the tokenizer from {name}: {lines[0] if lines else error!r}\n"
                "fix: the model folder needs its tokenizer files (tokenizer.json, "
                "tokenizer_config.json), or set model.tokenizer"
            ) from None
        raise hub_failure(f"the tokenizer {name!r}", error) from None
    if tokenizer.eos_token_id is None:
        raise UserError("the tokenizer has no EOS token; qlc trains every example to end with it")
    template = chat_template_of(plan, input_paths)
    if template is not None:  # rendered by the tokenizer's sandboxed Jinja, saved with it
        tokenizer.chat_template = template
    if tokenizer.pad_token is None:  # labels, not the pad id, decide what is trained
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def train_smoke_tokenizer(texts: list[str], out: Path) -> None:
    """A byte-level BPE tokenizer like Llama 2's (adds <s>), trained on this run's data."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        texts,
        trainer=trainers.BpeTrainer(
            vocab_size=SMOKE_VOCAB,
            special_tokens=["<unk>", "<s>", "</s>"],
            show_progress=False,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<unk>",  # named: a model-specific tokenizer class would add one of its own
        clean_up_tokenization_spaces=False,
    )
    wrapped.chat_template = SMOKE_CHAT_TEMPLATE
    wrapped.save_pretrained(out)


def build_smoke_model(plan: Plan, rows: list[dict[str, Any]], out: Path) -> ModelSource:
    """A tiny random-weight model of model.architecture, saved for from_pretrained."""
    import torch
    from transformers import AutoModelForCausalLM

    train_smoke_tokenizer([json.dumps(row, ensure_ascii=False) for row in rows], out)
    torch.manual_seed(plan.job.seed)
    model = AutoModelForCausalLM.from_config(smoke_config(plan.model.architecture))
    model.to(torch.float32).save_pretrained(out)
    return ModelSource(str(out), None, local=True)


def smoke_config(architecture: str) -> Any:
    """The tiny configuration of `architecture` the smoke mode trains."""
    from transformers import AutoConfig

    model_type, features = SMOKE_ARCHITECTURES[architecture]
    return AutoConfig.for_model(model_type, **{**SMOKE_SHAPE, **features})


def check_model_type(model: ModelPlan, model_type: Any, where: str) -> None:
    """The model is of the architecture the plan was decided for (model.architecture)."""
    if model_type not in model.model_types:
        raise UserError(
            f"{where}: model_type {model_type!r} is not model.architecture = "
            f"{model.architecture!r} (model_type {' or '.join(model.model_types)}): set "
            "model.architecture to the model's family"
        )


def config_model_type(directory: str) -> Any:
    """The model_type a local model directory's config.json names (None if unreadable)."""
    try:
        config = json.loads(Path(directory, "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return config.get("model_type") if isinstance(config, dict) else None


@contextmanager
def quantized_on_gpu_kept_on_host(enabled: bool) -> Iterator[None]:
    """While loading into host memory (the streamed setting): every weight is quantized by
    bitsandbytes' CUDA kernel (the same bits as a GPU load, and fast; its CPU path is a slow
    reference) and the result kept in host memory, so the GPU never holds more than the
    weight being quantized."""
    if not enabled:
        yield
        return
    import bitsandbytes.functional as bnbf
    import torch

    original = bnbf.quantize_4bit
    gpu = torch.device("cuda", torch.cuda.current_device())

    def on_gpu(A: Any, *args: Any, **kwargs: Any) -> Any:
        if A.device.type != "cpu":
            return original(A, *args, **kwargs)
        packed, state = original(A.to(gpu), *args, **kwargs)
        state.to("cpu")  # in place
        return packed.cpu(), state

    bnbf.quantize_4bit = on_gpu
    try:
        yield
    finally:
        bnbf.quantize_4bit = original
        torch.cuda.empty_cache()  # the quantization buffers: training reuses none of them


def device_map(plan: Plan, use_cpu: bool, local_rank: int, world_size: int) -> Any:
    if plan.engine.base_weights == "streamed" and not use_cpu:
        return {"": "cpu"}  # loaded (and quantized) on the host; the engine streams it
    if use_cpu or plan.engine.sharded(world_size):
        return None  # FSDP places the shards itself
    return {"": local_rank}


def load_model(
    plan: Plan, source: ModelSource, use_cpu: bool, local_rank: int, world_size: int
) -> Any:
    """The base as the plan loads it (4-bit, compute dtype), prepared and wrapped with LoRA."""
    from peft import get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-weight loading bars: noise in run.log
    warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
    quant, engine = plan.quantization, plan.engine
    on_host = engine.base_weights == "streamed" and not use_cpu
    with quantized_on_gpu_kept_on_host(on_host):
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source.path_or_id,
                revision=source.revision,
                token=os.environ.get("HF_TOKEN") or None,
                trust_remote_code=plan.model.trust_remote_code,
                quantization_config=bnb_config(quant),
                dtype=torch_dtype(quant.compute_dtype),
                device_map=device_map(plan, use_cpu, local_rank, world_size),
            )
        except OSError as error:
            if source.local:
                raise UserError(
                    f"cannot load the model from {source.path_or_id}: {error}"
                ) from None
            raise hub_failure(f"the model {source.path_or_id!r}", error) from None
    check_model_type(plan.model, model.config.model_type, source.path_or_id)
    # The reference engine trains peft's float32 upcast of every weight that is not 4-bit
    # (plan: activations float32). The fast engine computes the activations in the compute
    # dtype itself, so the upcast would only double those weights in memory.
    if quant.load_in_4bit and engine.name == "reference":
        # the Trainer turns recomputation on itself (plan: recompute), without reentrance
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    for module in model.modules():
        # bitsandbytes repacks 4-bit weights on CPU at the first no-grad forward (an eval) and
        # trains on with other numerics, so a run resumed past an eval would diverge.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # noqa: B010
    model.config.use_cache = False
    return get_peft_model(model, lora_config(plan.lora))
