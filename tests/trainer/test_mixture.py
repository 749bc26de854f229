"""Several datasets mixed (data.sources): each source's evaluation rows held out, its training
rows taken `weight` times (a seeded sample for a fraction), all shuffled together by job.seed;
each source checked by itself; the manifest's record hashes every source's file."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from data_support import plan_of, write_jsonl

from qlc import contract
from qlc.compiler.plan import Plan
from qlc.trainer.errors import UserError
from qlc.trainer.provenance import mixture_record
from qlc.trainer.render import check_sources
from qlc.trainer.rows import Row, head_rows, load_rows


def mixture_plan(weights: tuple[float, float], seed: int = 3, eval_fraction: float = 0.0) -> Plan:
    sources = "".join(
        f'[[data.sources]]\npath = "{name}.jsonl"\nweight = {weight}\n'
        for name, weight in zip("ab", weights, strict=True)
    )
    head = f'[job]\nname = "t"\nseed = {seed}\n[model]\npath = "tiny/model"\n'
    return plan_of(f'format = "text"\neval_fraction = {eval_fraction}\n' + sources, head=head)


@pytest.fixture
def two_files(tmp_path: Path) -> dict[str, str]:
    write_jsonl(tmp_path / "a.jsonl", [{"text": f"a{i}"} for i in range(10)])
    write_jsonl(tmp_path / "b.jsonl", [{"text": f"b{i}"} for i in range(8)])
    return {f"data.sources[{i}].path": str(tmp_path / f"{n}.jsonl") for i, n in enumerate("ab")}


def origins(rows: list[Row]) -> Counter[str]:
    return Counter(row["text"][0] for row in rows)


def test_weights_repeat_rows_and_sample_fractions(two_files: dict[str, str]) -> None:
    rows = load_rows(mixture_plan((2, 0.5)), None, None, two_files)
    assert origins(rows.train) == {"a": 20, "b": 4}
    texts = Counter(row["text"] for row in rows.train)
    assert all(texts[f"a{i}"] == 2 for i in range(10))  # every row of a, twice
    assert len({t for t in texts if t.startswith("b")}) == 4  # half of b's rows, once each
    assert [(s.train_rows, s.eval_rows, len(s.rows)) for s in rows.sources] == [
        (20, 0, 10),
        (4, 0, 8),
    ]
    assert rows.local_file is None and "a.jsonl" in rows.source and "b.jsonl" in rows.source


def test_mixing_is_seeded_interleaved_and_reproducible(two_files: dict[str, str]) -> None:
    first = load_rows(mixture_plan((1, 1)), None, None, two_files).train
    again = load_rows(mixture_plan((1, 1)), None, None, two_files).train
    other = load_rows(mixture_plan((1, 1), seed=4), None, None, two_files).train
    assert (
        first == again and first != other and Counter(map(str, first)) == Counter(map(str, other))
    )
    order = "".join(row["text"][0] for row in first)
    assert order not in ("a" * 10 + "b" * 8, "b" * 8 + "a" * 10)  # the sources interleave


def test_evaluation_rows_are_held_out_of_each_source_before_weighting(
    two_files: dict[str, str],
) -> None:
    rows = load_rows(mixture_plan((3, 1), eval_fraction=0.25), None, None, two_files)
    held = {row["text"] for row in rows.eval}
    assert origins(rows.eval) == {"a": 2, "b": 2}  # round(10 x 0.25), round(8 x 0.25)
    assert not held & {row["text"] for row in rows.train}  # never trained on, whatever the weight
    assert origins(rows.train) == {"a": 24, "b": 6}


def test_a_source_without_the_field_is_named_not_diluted(two_files: dict[str, str]) -> None:
    write_jsonl(Path(two_files["data.sources[1].path"]), [{"body": "x"}] * 8)
    plan = mixture_plan((1, 1))
    rows = load_rows(plan, None, None, two_files)
    with pytest.raises(UserError) as raised:
        check_sources(rows, plan.data)
    assert str(raised.value).startswith(f"{two_files['data.sources[1].path']}: no train row has")
    assert "'body'" in str(raised.value)


def test_a_missing_source_file_names_its_key(tmp_path: Path) -> None:
    with pytest.raises(UserError) as raised:
        load_rows(mixture_plan((1, 1)), None, None, {"data.sources[0].path": str(tmp_path)})
    assert "the spec's data.sources[0].path" in str(raised.value)


def test_the_record_hashes_each_source_file_with_its_weight(two_files: dict[str, str]) -> None:
    rows = load_rows(mixture_plan((2, 0.5)), None, None, two_files)
    record = mixture_record(rows.sources)
    a, b = (Path(two_files[f"data.sources[{i}].path"]) for i in range(2))
    assert record["files"] == {
        contract.source_file_name(0, "a.jsonl"): contract.sha256_file(a),
        contract.source_file_name(1, "b.jsonl"): contract.sha256_file(b),
    }
    assert [(s["path"], s["weight"], s["train_rows"]) for s in record["sources"]] == [
        (str(a), 2.0, 20),
        (str(b), 0.5, 4),
    ]


def test_head_rows_reads_only_the_first_rows(tmp_path: Path) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b"}\nnot json at all\n', encoding="utf-8")
    assert head_rows(str(path), "jsonl", 2) == [{"text": "a"}, {"text": "b"}]
    with pytest.raises(UserError) as raised:
        head_rows(str(path), "jsonl", 3)
    assert str(raised.value).startswith(f"{path}:4: not a JSON line")  # the file's own line
