"""qlc merge --format gguf: llama.cpp's converter on the verified merge, checked by llama.cpp.

The tiny run (conftest's trained_tiny_run) is merged, converted, quantized and verified by
`qlc merge`; the tests then check the result independently: the GGUF's metadata read with the
`gguf` package, the Modelfile, and (f16) llama.cpp's logits against a merged model the test
makes itself, under the bound merge.json states, with the adapter's effect far above it.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("peft")
llama_cpp = pytest.importorskip("llama_cpp")
gguf = pytest.importorskip("gguf")

from tiny_runs import TINY, call_cli  # noqa: E402

from qlc.runtime.gguf_convert import pre_tokenizer_from_config  # noqa: E402

PROMPTS = ("<s>[INST] Name three rivers. [/INST]", "<s>[INST] Hello [/INST] Hi there")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def gguf_string(reader: object, key: str) -> str:
    value = reader.get_field(key)  # type: ignore[attr-defined]
    return bytes(value.parts[value.data[0]]).decode("utf-8")


def gguf_int(reader: object, key: str) -> int:
    value = reader.get_field(key)  # type: ignore[attr-defined]
    return int(value.parts[value.data[0]][0])


@pytest.mark.slow
@pytest.mark.parametrize("quant", ["f16", "q8_0", "q4_k_m"])
def test_gguf_loads_tokenizes_and_matches_the_merge(
    trained_tiny_run: Path, tmp_path: Path, quant: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from transformers import AutoTokenizer

    out = tmp_path / "gguf"
    args = ["merge", str(trained_tiny_run), "-o", str(out), "--format", "gguf", "--quant", quant]
    code, printed, err = call_cli(args, capsys)
    assert code == 0, err
    assert "tokenizes" in printed
    assert sorted(p.name for p in out.iterdir()) == [
        "Modelfile",
        "merge.json",
        f"model-{quant}.gguf",
    ]
    record = json.loads((out / "merge.json").read_text())
    assert record["format"] == "gguf" and record["quant"] == quant
    assert record["source_manifest_sha256"] == sha256(trained_tiny_run / "manifest.json")
    assert record["files"] == {p.name: sha256(p) for p in out.iterdir() if p.name != "merge.json"}
    check = record["verification"]
    assert check["problems"] == [] and check["token_mismatches"] == []
    assert check["token_texts"] == check["prompts"] + 1  # the prompts and the probe text
    assert check["max_abs_diff"] <= check["tolerance"]["bound"]
    assert check["mean_abs_diff"] <= check["tolerance"]["mean_bound"]
    if quant != "q4_k_m":  # its max bound says nothing (gguf_verify.RTOL)
        assert check["adapter_effect_max_abs"] > check["tolerance"]["bound"]
    assert record["converter"]["pre_tokenizer_from_config"] is True  # the tiny vocabulary

    tokenizer = AutoTokenizer.from_pretrained(str(trained_tiny_run / "adapter"))
    reader = gguf.GGUFReader(str(out / f"model-{quant}.gguf"))
    assert gguf_string(reader, "tokenizer.chat_template") == tokenizer.chat_template
    assert gguf_int(reader, "tokenizer.ggml.bos_token_id") == tokenizer.bos_token_id
    assert gguf_int(reader, "tokenizer.ggml.eos_token_id") == tokenizer.eos_token_id
    assert gguf_string(reader, "tokenizer.ggml.pre") == "gpt-2"

    modelfile = (out / "Modelfile").read_text()
    assert modelfile == (
        f"FROM ./model-{quant}.gguf\n"
        'TEMPLATE """{{ .Prompt }}"""\n'  # the tiny spec trains on raw text
        'PARAMETER stop "</s>"\n'
    )


@pytest.mark.slow
def test_f16_logits_match_a_merge_made_here(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Independent of qlc's own check: llama.cpp on the GGUF against transformers on a merge."""
    import numpy as np
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "gguf"
    args = ["merge", str(trained_tiny_run), "-o", str(out), "--format", "gguf", "--quant", "f16"]
    code, _, err = call_cli(args, capsys)
    assert code == 0, err
    bound = json.loads((out / "merge.json").read_text())["verification"]["tolerance"]["bound"]

    tokenizer = AutoTokenizer.from_pretrained(str(trained_tiny_run / "adapter"))
    base = AutoModelForCausalLM.from_pretrained(TINY / "model", dtype=torch.bfloat16).float()
    tuned = PeftModel.from_pretrained(base, str(trained_tiny_run / "adapter")).eval()
    merged = tuned.merge_and_unload().to(torch.bfloat16).float().eval()
    base_alone = AutoModelForCausalLM.from_pretrained(TINY / "model", dtype=torch.bfloat16)
    base_alone = base_alone.float().eval()
    llm = llama_cpp.Llama(str(out / "model-f16.gguf"), n_ctx=128, logits_all=True, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            llm.reset()
            llm.eval(ids)
            ours = np.array(llm.scores[: len(ids)])
            with torch.no_grad():
                theirs = merged(input_ids=torch.tensor([ids])).logits[0].numpy()
                plain = base_alone(input_ids=torch.tensor([ids])).logits[0].numpy()
            assert float(np.abs(ours - theirs).max()) <= bound
            assert float(np.abs(plain - theirs).max()) > 5 * bound  # the adapter shows
    finally:
        llm.close()


@pytest.mark.slow
def test_bad_input_and_failed_verification_write_nothing(
    trained_tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    parent = tmp_path / "out"
    parent.mkdir()
    target = str(parent / "gguf")
    base = ["merge", "-o", target, "--format", "gguf"]

    code, _, err = call_cli([*base, str(trained_tiny_run), "--quant", "q3_weird"], capsys)
    assert code == 2 and "--quant must be one of f16, q8_0, q4_k_m" in err

    broken = Path(shutil.copytree(trained_tiny_run, tmp_path / "run"))
    weights = broken / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\0")
    code, _, err = call_cli([*base, str(broken)], capsys)
    assert code == 2 and "sha256 differs" in err

    code, _, err = call_cli([*base, str(trained_tiny_run), "--format", "onnx"], capsys)
    assert code == 2 and "--format must be hf or gguf" in err
    assert list(parent.iterdir()) == []

    from qlc.runtime import gguf_verify

    monkeypatch.setattr(gguf_verify, "MEAN_RTOL", {**gguf_verify.MEAN_RTOL, "q4_k_m": 1e-6})
    code, _, err = call_cli([*base, str(trained_tiny_run), "--quant", "q4_k_m"], capsys)
    assert code == 1 and "llama.cpp's logits differ from the merged model's" in err
    assert "nothing was written" in err
    assert list(parent.iterdir()) == []


def test_only_the_plain_gpt2_byte_level_configuration_falls_back(tmp_path: Path) -> None:
    config = json.loads((TINY / "model" / "tokenizer.json").read_text())
    variants = [
        ("gpt-2", config),
        (None, {**config, "pre_tokenizer": {**config["pre_tokenizer"], "add_prefix_space": True}}),
        (None, {**config, "pre_tokenizer": {**config["pre_tokenizer"], "use_regex": False}}),
        (None, {**config, "normalizer": {"type": "NFC"}}),
        (None, {**config, "pre_tokenizer": {"type": "Metaspace", "replacement": "\u2581"}}),
    ]
    for index, (expected, document) in enumerate(variants):
        folder = tmp_path / str(index)
        folder.mkdir()
        (folder / "tokenizer.json").write_text(json.dumps(document))
        assert pre_tokenizer_from_config(folder) == expected, document["pre_tokenizer"]
    assert pre_tokenizer_from_config(tmp_path) is None  # no tokenizer.json


def test_the_pinned_versions_agree() -> None:
    """pyproject's gguf extra installs the llama-cpp-python whose sdist hash qlc pins."""
    import tomllib

    from qlc.runtime.gguf_tools import LLAMA_CPP_PYTHON

    project = tomllib.loads((TINY.parents[1] / "pyproject.toml").read_text())
    extra = project["project"]["optional-dependencies"]["gguf"]
    assert f"llama-cpp-python=={LLAMA_CPP_PYTHON}" in extra
    assert llama_cpp.__version__ == LLAMA_CPP_PYTHON
