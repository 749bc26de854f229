"""qlc merge: a plain-transformers model whose logits match base + adapter, or nothing at all.

One tiny run per session, shared read-only with test_generate (conftest's trained_tiny_run:
high learning rate, a few steps, so the adapter moves the logits far more than the merge
tolerance). The test recomputes base + adapter itself with peft and compares it
with the merged model loaded without peft, under the tolerance merge.json states.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("bitsandbytes")

from tiny_runs import TINY, call_cli  # noqa: E402

PROMPTS = ("<s>[INST] Name three rivers. [/INST]", "<s>[INST] Hello [/INST] Hi there")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def float32_logits(model: object, tokenizer: object) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for prompt in PROMPTS:
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            out.append(model(input_ids=ids).logits.float())  # type: ignore[operator]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_merged_model_loads_without_peft_and_matches(
    trained_tiny_run: Path, tmp_path: Path, dtype: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    merged_dir = tmp_path / "merged"
    code, printed, err = call_cli(
        ["merge", str(trained_tiny_run), "-o", str(merged_dir), "--dtype", dtype], capsys
    )
    assert code == 0, err
    assert "merge.json" in printed
    record = json.loads((merged_dir / "merge.json").read_text())
    assert record["dtype"] == dtype
    assert record["source_manifest_sha256"] == sha256(trained_tiny_run / "manifest.json")
    on_disk = {p.name: sha256(p) for p in merged_dir.iterdir() if p.name != "merge.json"}
    assert record["files"] == on_disk
    assert any(name.endswith(".safetensors") for name in on_disk)
    assert not (merged_dir / "adapter_config.json").exists()

    weights = torch.bfloat16 if dtype == "bf16" else torch.float16
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=weights)
    assert not hasattr(merged, "peft_config")  # a plain transformers model
    assert merged.dtype == weights
    base = AutoModelForCausalLM.from_pretrained(TINY / "model", dtype=weights).float()
    tuned = PeftModel.from_pretrained(base, str(trained_tiny_run / "adapter")).eval()
    tokenizer = AutoTokenizer.from_pretrained(merged_dir)

    reference = float32_logits(tuned, tokenizer)
    got = float32_logits(merged.float().eval(), tokenizer)
    bound = record["tolerance"]["bound"]
    diff = max(float((a - b).abs().max()) for a, b in zip(reference, got, strict=True))
    assert diff <= bound
    with tuned.disable_adapter():
        plain = float32_logits(tuned, tokenizer)
    effect = max(float((a - b).abs().max()) for a, b in zip(reference, plain, strict=True))
    assert effect > 10 * bound  # the comparison can tell a merged adapter from none
    assert record["adapter_effect_detectable"] is True


def left_behind(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir())


@pytest.mark.slow
def test_a_wrong_merge_fails_verification_and_writes_nothing(
    trained_tiny_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from peft.tuners.lora import LoraModel

    monkeypatch.setattr(LoraModel, "merge_and_unload", lambda self, *a, **kw: self.unload())
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = call_cli(["merge", str(trained_tiny_run), "-o", str(out / "merged")], capsys)
    assert code == 1
    assert "merged logits differ from base + adapter" in err and "nothing was written" in err
    assert left_behind(out) == []


@pytest.mark.slow
def test_bad_inputs_are_refused_and_write_nothing(
    trained_tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    target = str(out / "merged")

    broken = tmp_path / "run"
    shutil.copytree(trained_tiny_run, broken, ignore=shutil.ignore_patterns("checkpoints"))
    config = broken / "adapter" / "adapter_config.json"
    config.write_text(config.read_text().replace('"r": 8', '"r": 4'))
    code, _, err = call_cli(["merge", str(broken), "-o", target], capsys)
    assert code == 2 and "adapter_config.json: sha256 differs" in err

    model = tmp_path / "model"
    shutil.copytree(TINY / "model", model)
    (model / "model.safetensors").write_bytes(b"")
    code, _, err = call_cli(
        ["merge", str(trained_tiny_run), "-o", target, "--model", str(model)], capsys
    )
    assert code == 2 and "model.safetensors differs" in err

    shutil.rmtree(model)
    code, _, err = call_cli(
        ["merge", str(trained_tiny_run), "-o", target, "--model", str(model)], capsys
    )
    assert code == 2 and "is missing" in err

    shutil.rmtree(broken / "adapter")
    code, _, err = call_cli(["merge", str(broken), "-o", target], capsys)
    assert code == 2 and "no adapter here" in err

    code, _, err = call_cli(
        ["merge", str(trained_tiny_run), "-o", target, "--dtype", "fp32"], capsys
    )
    assert code == 2 and "--dtype must be one of bf16, fp16" in err
    assert left_behind(out) == []

    (out / "merged").mkdir()
    (out / "merged" / "keep.txt").write_text("mine")
    code, _, err = call_cli(["merge", str(trained_tiny_run), "-o", target], capsys)
    assert code == 2 and "is not empty" in err
    assert left_behind(out / "merged") == ["keep.txt"]
