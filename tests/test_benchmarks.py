"""tests for benchmarks/*.py: each script runs on CPU with its smallest options and writes its table as JSON;
CUDA-only backends report n/a (None) when there is no GPU."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load_script(name: str):
    """Import benchmarks/NAME.py as a module (the scripts are not a package)."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def strict_json(path: Path):
    """Parse as standard JSON: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{path} holds {constant}, which is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


def positive_finite(value) -> bool:
    return isinstance(value, float | int) and math.isfinite(value) and value > 0


@pytest.fixture
def no_cuda(monkeypatch):
    """The CPU path, also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def table_lines(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = lines.index(f"# {title}")
    return lines[start:]


# ------------------------------------------------------------------------------------------- common.py


def test_time_fn_is_the_median_after_warmup(monkeypatch):
    common = load_script("common")
    clock = [0.0]
    durations = iter([5.0] * 3 + [3.0, 1.0, 2.0])  # warm-up calls (not timed), then three timed ones

    def fn():
        clock[0] += next(durations)

    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])
    assert common.time_fn(fn, torch.device("cpu"), warmup=3, repeats=3) == 2.0
    assert next(durations, None) is None  # exactly warmup + repeats calls


def test_json_keeps_numbers_and_writes_na_as_null(tmp_path):
    common = load_script("common")
    common.write_json(str(tmp_path / "sub" / "t.json"), {"a": [1.5, float("nan")], "b": {"c": float("inf")}})
    assert strict_json(tmp_path / "sub" / "t.json") == {"a": [1.5, None], "b": {"c": None}}
    common.write_json(None, {"a": 1})  # no --json: nothing written, no error


# --------------------------------------------------------------------------------------- bench_fakequant


def test_fakequant_backends_without_cuda():
    bench = load_script("bench_fakequant")
    from ckaqad.formats import nvfp4

    found = bench.backends(torch.device("cpu"))
    assert found == {"torch reference": nvfp4.fake_quantize_reference, "triton fused": None, "modelopt": None}
    assert bench.modelopt_backend(torch.device("cpu")) is None


def test_fakequant_table_and_json(tmp_path, capsys, no_cuda):
    bench = load_script("bench_fakequant")
    path = tmp_path / "fq.json"
    payload = bench.main(["--repeats", "1", "--dtype", "float32", "--json", str(path)])
    assert strict_json(path) == payload  # every value is finite or a string: nothing turned into null
    header, records = payload["header"], payload["results"]
    assert header["device"] == "cpu" and header["torch"] == torch.__version__ and header["dtype"] == "float32"
    assert header["cpu_threads"] >= 1 and "gpu" not in header
    assert [(r["name"], r["backend"]) for r in records] == [
        (s.name, b) for s in bench.CPU_SHAPES for b in ("torch reference", "triton fused", "modelopt")]
    for r in records:
        if r["backend"] != "torch reference":
            assert r == {"rows": r["rows"], "cols": r["cols"], "name": r["name"], "backend": r["backend"],
                         "available": False}
            continue
        assert r["available"] is True
        assert all(positive_finite(r[k]) for k in ("ms", "gb_s", "copy_gb_s", "fraction_of_copy"))
        moved = 2 * r["rows"] * r["cols"] * 4  # read + write, float32
        assert r["gb_s"] * 1e9 * r["ms"] / 1e3 == pytest.approx(moved)
        assert r["fraction_of_copy"] == pytest.approx(r["gb_s"] / r["copy_gb_s"])

    lines = table_lines(capsys.readouterr().out, "NVFP4 fake-quant throughput")
    assert lines[1].startswith("# device=cpu, torch=")
    assert lines[2].split() == ["shape", "size", "backend", "ms", "GB/s", "of", "copy"]
    rows = lines[3:3 + 4 * len(bench.CPU_SHAPES)]
    assert sum(row.split()[-3:] == ["n/a"] * 3 for row in rows) == 2 * len(bench.CPU_SHAPES)
    assert sum(row.rstrip().endswith(" 1") and "copy (clone)" in row for row in rows) == len(bench.CPU_SHAPES)


# -------------------------------------------------------------------------------------------- bench_step


def test_step_quick_table_and_json(tmp_path, capsys, no_cuda):
    import transformers

    bench = load_script("bench_step")
    path = tmp_path / "step.json"
    payload = bench.main(["--quick", "--json", str(path)])
    written = strict_json(path)
    header, records = payload["header"], payload["results"]
    assert written["header"] == header and header["device"] == "cpu" and header["scheme"] == "w4a4"
    assert math.isfinite(header["matmul_tflops"]) and header["matmul_tflops"] >= 0  # TFLOP/s, rounded to 0.01
    assert [r["loss"] for r in records] == ["kl", "kl+cka"]

    shape = records[0]
    config = transformers.LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
                                      num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
                                      num_key_value_heads=shape["kv_heads"], vocab_size=shape["vocab"],
                                      tie_word_embeddings=True)
    params = sum(p.numel() for p in transformers.LlamaForCausalLM(config).parameters())
    tokens = shape["batch"] * shape["seq"]
    for r, saved in zip(records, written["results"], strict=True):
        assert all(positive_finite(r[k]) for k in ("step_ms", "tokens_per_s", "flops_per_s", "mfu"))
        assert r["params"] == params
        assert r["tokens_per_s"] == pytest.approx(tokens / (r["step_ms"] / 1e3))
        assert r["flops_per_s"] == pytest.approx(8 * params * r["tokens_per_s"])
        assert r["step_overhead_vs_kl"] == pytest.approx(r["step_ms"] / records[0]["step_ms"] - 1)
        assert math.isnan(r["peak_mb"]) and saved["peak_mb"] is None  # CUDA-only: n/a on CPU, null in JSON
        assert saved == {**r, "peak_mb": None}

    lines = table_lines(capsys.readouterr().out, "QAD step: KL-only vs CKA-QAD")
    assert lines[1].startswith("# device=cpu, torch=") and "matmul_tflops=" in lines[1]
    assert lines[2].split() == ["model", "batch", "loss", "step", "ms", "tokens/s", "peak", "MB", "MFU", "+time",
                                "+memory"]
    assert [row.split()[2] for row in lines[3:5]] == ["kl", "kl+cka"]


def test_step_ratios_quick_table_and_json(tmp_path, capsys, no_cuda):
    """--ratios: every step variant and the layer's fake quants, each ratio the quotient of two timed medians
    from the same run (plain of the same dtype; CKA-QAD over KL-QAD; the reference fake quant over the fused)."""
    bench = load_script("bench_step")
    path = tmp_path / "ratios.json"
    payload = bench.main(["--ratios", "--quick", "--json", str(path)])
    assert strict_json(path)["steps"] == payload["steps"]
    layer = {r["what"]: r for r in payload["layer"]}
    gemm = layer["GEMM fp32 (512x576 @ 576x1536)"]
    for r in layer.values():
        assert positive_finite(r["ms"]) and r["vs_fp32_gemm"] == pytest.approx(r["ms"] / gemm["ms"])
    steps = {r["what"]: r for r in payload["steps"]}
    assert set(steps) == {f"{kind} {variant}" for kind, variant in
                          [("step", "plain fp32 kl"), ("fwd+bwd", "plain fp32"), ("step", "w4a4 fp32 kl"),
                           ("fwd+bwd", "w4a4 fp32"), ("step", "w4a4 fp32 kl+cka"),
                           ("step", "w4a4 fp32 kl, reference fq"), ("step", "plain bf16 kl"),
                           ("fwd+bwd", "plain bf16"), ("step", "w4a4 bf16 kl"), ("fwd+bwd", "w4a4 bf16"),
                           ("step", "w4a4 bf16 kl+cka")]}
    for dtype in ("fp32", "bf16"):
        plain = steps[f"step plain {dtype} kl"]["ms"]
        kl = steps[f"step w4a4 {dtype} kl"]
        assert kl["vs_plain_same_dtype"] == pytest.approx(kl["ms"] / plain)
        assert steps[f"step w4a4 {dtype} kl+cka"]["vs_kl"] == pytest.approx(
            steps[f"step w4a4 {dtype} kl+cka"]["ms"] / kl["ms"])
        fwd = steps[f"fwd+bwd w4a4 {dtype}"]
        assert fwd["vs_plain_same_dtype"] == pytest.approx(fwd["ms"] / steps[f"fwd+bwd plain {dtype}"]["ms"])
    ref = steps["step w4a4 fp32 kl, reference fq"]
    assert ref["vs_kl"] == pytest.approx(ref["ms"] / steps["step w4a4 fp32 kl"]["ms"])
    lines = table_lines(capsys.readouterr().out, "Plain vs quantized step, side by side")
    assert "bf16_units=" in lines[1]
    assert [row.strip().startswith(name) for row, name in zip(lines[3:], steps, strict=False)] == [True] * len(steps)


def test_step_ratios_thread_clock_and_row_filter(no_cuda, one_thread):
    """--clock thread (the one thread's CPU time, for a shared machine) is said in the header and refused with
    more threads; --step-rows keeps only the matching step variants (and their forward+backward)."""
    bench = load_script("bench_step")
    payload = bench.main(["--ratios", "--quick", "--clock", "thread", "--step-rows", "w4a4 fp32 kl$"])
    assert payload["header"]["clock"] == "thread"
    steps = {r["what"]: r for r in payload["steps"]}
    assert set(steps) == {"step w4a4 fp32 kl", "fwd+bwd w4a4 fp32"}
    assert all(positive_finite(r["ms"]) and r["vs_plain_same_dtype"] is None for r in steps.values())
    torch.set_num_threads(2)
    with pytest.raises(SystemExit, match="one thread"):
        bench.main(["--ratios", "--quick", "--clock", "thread"])


# -------------------------------------------------------------------------------------------- rl_seeds


def test_rl_seeds_runs_each_algorithm_and_seed_once_and_summarises_the_final_evaluations(tmp_path, monkeypatch,
                                                                                         capsys):
    """The grid calls `ckaqad rl` once per (algorithm, seed), the base evaluation in each algorithm's first run, reuses
    finished runs, and its table is mean / sample std / min / max of each run's final evaluation."""
    bench = load_script("rl_seeds")
    calls = []

    def fake_rl(argv):
        calls.append(argv)
        out = Path(argv[argv.index("--out") + 1])
        seed, algo = int(argv[argv.index("--seed") + 1]), argv[argv.index("--algo") + 1]
        out.mkdir(parents=True)
        accuracy = 0.1 * (seed + 1) + (0.05 if algo == "abc-grpo" else 0.0)
        records = [{"kind": "eval", "step": 0, "heldout_accuracy": 0.09, "heldout_entropy": 1.1,
                    "heldout_kl_ref": 0.0, "heldout_length": 30.0}] if "--no-eval-at-start" not in argv else []
        records += [{"kind": "train", "step": s, "reward_mean": 0.1 * s, "entropy": 1.5, "clipped": 0.2,
                     "grpo_unbounded": 0.01 * s, "ratio_mean": 1.0, "skipped": 0} for s in (1, 2)]
        records.append({"kind": "eval", "step": 2, "heldout_accuracy": accuracy, "heldout_entropy": 1.0 + seed,
                        "heldout_kl_ref": 0.1, "heldout_length": 31.0})
        (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (out / "summary.json").write_text("{}")
        return 0

    monkeypatch.setattr(bench.cli, "main", fake_rl)
    monkeypatch.setattr(bench, "plot_runs", lambda runs, path, title: path.write_text("png"))
    monkeypatch.setattr(sys, "argv", ["rl_seeds.py", "--seeds", "0", "1", "2", "--out", str(tmp_path), "--",
                                      "--steps", "2"])
    bench.main()
    assert [(c[c.index("--algo") + 1], c[c.index("--seed") + 1]) for c in calls] == [
        ("grpo", "0"), ("abc-grpo", "0"), ("grpo", "1"), ("abc-grpo", "1"), ("grpo", "2"), ("abc-grpo", "2")]
    assert ["--no-eval-at-start" in c for c in calls] == [False, False, True, True, True, True]
    assert all(c[c.index("--steps") + 1] == "2" and "--lr" not in c for c in calls)  # the flags after `--` only
    saved = strict_json(tmp_path / "rl_seeds.json")
    accuracy = saved["summary"]["abc-grpo"]["heldout_accuracy"]
    assert accuracy["values"] == pytest.approx([0.15, 0.25, 0.35])
    assert accuracy["mean"] == pytest.approx(0.25) and accuracy["std"] == pytest.approx(0.1)
    assert (accuracy["min"], accuracy["max"]) == pytest.approx((0.15, 0.35))
    assert saved["summary"]["grpo"]["mean_grpo_unbounded"]["mean"] == pytest.approx(0.015)
    assert saved["base"]["heldout_accuracy"] == 0.09
    out = capsys.readouterr().out
    assert "| base (step 0) | 0.090 |" in out and "| abc-grpo (n=3) | 0.250 ± 0.100 [0.150, 0.350] |" in out

    calls.clear()
    bench.main()  # every run finished: nothing is run again
    assert calls == []


# ------------------------------------------------------------------------------------------- MoE (issue 19)


def test_bench_moe_quant_runs_every_mechanism_on_cpu(tmp_path, no_cuda, capsys):
    bench = load_script("bench_moe_quant")
    payload = bench.main(["--small", "--repeats", "1", "--json", str(tmp_path / "moe.json")])
    mechanisms = [r["mechanism"] for r in payload["results"]]
    assert mechanisms == ["bf16 experts (no quant)", "class swap (ckaqad)", "class swap, per-expert calls",
                          "parametrization", "per-expert Linear"]  # each checked equal to ckaqad's output first
    assert all(positive_finite(r["ms"]) for r in payload["results"])
    assert strict_json(tmp_path / "moe.json")["results"] == json.loads(json.dumps(payload["results"]))
    assert table_lines(capsys.readouterr().out, "Fused-experts fake quant: forward + backward of one MoE layer")


def test_moe_coverage_reaches_99_percent_outside_declared_rules(tmp_path):
    coverage = load_script("moe_coverage")
    payload = coverage.main(["--json", str(tmp_path / "coverage.json")])
    assert [r["family"] for r in payload["results"]] == ["qwen3", "qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3",
                                                         "nemotron_h"]
    assert all(r["share_outside_declared"] >= 0.99 and r["share"] >= 0.97 for r in payload["results"])
