"""diagnose -> distill --loss kl+cka through the CLI on a tiny model of every MoE / hybrid family: the coverage is
printed, the per-block-kind CKA summary is written, and the routed experts train (they are quantized students,
not frozen high-precision tensors)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_tokenizer
from moe_helpers import FAMILIES, make_tiny_moe
from safetensors.torch import load_file

from ckaqad.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "kappa", "lambda"]


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("moe_data")
    gen = torch.Generator().manual_seed(0)
    docs = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (30,), generator=gen).tolist())
            for _ in range(16)]
    (root / "data.txt").write_text("\n\n".join(docs))
    return root / "data.txt"


COMMON = ["--seq-len", "16", "--heldout-fraction", "0.25", "--eval-blocks", "2", "--batch-size", "2",
          "--device", "cpu", "--calib-batches", "1", "--calib-batch-size", "2"]


@pytest.mark.parametrize("family", FAMILIES)
def test_diagnose_then_distill_kl_cka(family, data_file, tmp_path, capsys):
    teacher = tmp_path / "teacher"
    make_tiny_moe(family).save_pretrained(teacher)
    make_tiny_tokenizer().save_pretrained(teacher)
    code = main(["diagnose", "--teacher", str(teacher), "--data", str(data_file), *COMMON, "--bootstrap", "0",
                 "--out", str(tmp_path / "diag")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "outside declared exclusions" in out
    report = json.loads((tmp_path / "diag" / "diagnosis.json").read_text())
    kinds = report["variants"][0]["cka_by_block_kind"]
    assert kinds and all(0.0 <= v["mean"] <= 1.0 for v in kinds.values())
    if family == "nemotron_h":
        assert set(kinds) == {"mamba", "moe", "attention"}

    code = main(["distill", "--teacher", str(teacher), "--data", str(data_file), *COMMON, "--steps", "2",
                 "--loss", "kl+cka", "--lr", "1e-3", "--warmup-steps", "0", "--cka-tokens", "16",
                 "--out", str(tmp_path / "run")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "outside declared exclusions" in out
    trained = load_file(str(next((tmp_path / "run").rglob("model.safetensors"))))
    original = make_tiny_moe(family).state_dict()
    experts = [k for k in original if k.endswith(("gate_up_proj", "experts.up_proj", "experts.down_proj"))]
    assert (family == "qwen3") == (not experts)
    for key in experts:
        assert not torch.equal(trained[key], original[key]), key  # the experts trained
