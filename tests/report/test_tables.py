"""Markdown tables of the reports."""

from __future__ import annotations

import pytest

from ckaqad.eval.fidelity import Fidelity
from ckaqad.report.tables import (
    block_kind_lines,
    block_kind_metrics,
    block_kind_summary,
    cell,
    comparison_table,
    coverage_lines,
    fidelity_table,
    layer_table,
    metric_lines,
)


def result(label: str, rows: list[tuple[int, int, float]]) -> Fidelity:
    layers = [{"index": s, "teacher_index": t, "cka": c, "cka_debiased": c} for s, t, c in rows]
    return Fidelity(label=label, layers=layers, mean_cka=0.75, min_cka=0.5, min_cka_layer=1, mean_cka_debiased=0.7,
                    kl_per_token=0.125, perplexity=12.34567, top1_agreement=0.9)


def test_fidelity_table_has_the_teacher_row_first():
    lines = fidelity_table({"q": result("q", [(0, 0, 1.0), (1, 1, 0.5)])}, 10.0)
    assert lines[2] == "| teacher | 1 | 1 | 1 | 0 | 10.000 | 1 |"
    assert lines[3] == "| q | 0.7500 | 0.5000 (1) | 0.7000 | 0.1250 | 12.346 | 0.900 |"


def test_layer_table_rows_are_student_blocks_and_name_a_different_teacher_block():
    lines = layer_table({"a": result("a", [(0, 0, 0.875), (1, 3, 0.5)]), "b": result("b", [(0, 0, 0.25)])})
    assert lines[0] == "| layer | a | b |"
    assert lines[2:] == ["| 0 | 0.8750 | 0.2500 |", "| 1 → 3 | 0.5000 | – |"]


def test_coverage_lines_count_reasons():
    q = {"quantized": ["a", "b"], "excluded": {"x": "r1", "y": "r1", "z": "r2"}, "quantized_params": 3,
         "total_linear_params": 4}
    assert coverage_lines({"int4": q, "none": {}}) == [
        "- int4: 2 Linear layers quantized (75% of Linear parameters); kept in high precision: 2 × r1; 1 × r2",
        "- none: 0 Linear layers quantized (0% of Linear parameters); kept in high precision: none"]


def test_cells_and_metric_tables():
    assert [cell(0.5), cell(3), cell(None), cell("x")] == ["0.5000", "3", "–", "x"]
    assert metric_lines({"a": 0.25, "n": 2}) == ["| metric | value |", "|---|---|", "| a | 0.2500 |", "| n | 2 |"]
    assert comparison_table({"m1": {"a": 1.0}, "m2": {}}, ["a"]) == [
        "| model | a |", "|---|---|", "| m1 | 1.0000 |", "| m2 | – |"]


def test_block_kind_summary_and_metrics_group_layers_by_block_type():
    layers = [{"index": 0, "cka": 0.9}, {"index": 1, "cka": 0.8}, {"index": 2, "cka": 0.7}, {"index": 3, "cka": 0.6}]
    kinds = ["mamba", "moe", "attention", "moe"]
    summary = block_kind_summary(layers, kinds)
    assert summary["moe"] == {"mean": pytest.approx(0.7), "min": 0.6, "layers": [1, 3]}
    assert block_kind_metrics(layers, kinds) == {"cka.mamba": 0.9, "cka.moe": pytest.approx(0.7),
                                                 "cka.attention": 0.7}
    assert block_kind_metrics(layers, ["attention+mlp"] * 4) == {}  # dense models keep their study tables
    lines = block_kind_lines({"nvfp4-w4a4": summary})
    assert lines[0] == "| block kind | blocks | nvfp4-w4a4 |" and "| moe | 2 | 0.7000 (0.6000) |" in lines
