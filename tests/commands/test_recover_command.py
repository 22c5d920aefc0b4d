"""`ckaqad recover` end to end on a tiny teacher that has learnt the general corpus: pruned weights stay
exactly zero (2:4 groups keep at most two non-zeros), a removed block stays removed and CKA pairs the kept
blocks with the teacher blocks they were, a quantized student stays quantized and exports, forgetting raises
the general held-out loss and recovery lowers it again; bad input is one line, exit 2, nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from conftest import make_tiny_model, make_tiny_tokenizer
from damage_helpers import SEQ_LEN, pretrained_tiny_teacher, write_corpora

from ckaqad.cli import main
from ckaqad.commands import damage
from ckaqad.damage.forget import ForgetConfig
from ckaqad.damage.pruning import n_m_violations, prunable_linears
from ckaqad.data.blocks import DataConfig
from ckaqad.models.arch import num_layers
from ckaqad.paths import DamageDir, ExportDir, RecoveryDir, RunDir
from ckaqad.quant.linear import QuantConfig
from ckaqad.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """teacher/ (CE-trained on general.txt), narrow.txt, and the teacher damaged four ways."""
    root = tmp_path_factory.mktemp("recover")
    pretrained_tiny_teacher(root / "teacher", steps=40)
    general, narrow = write_corpora(root)
    data = DataConfig(data=str(general), seq_len=SEQ_LEN)
    common = {"teacher": str(root / "teacher"), "data": data, "eval_blocks": 8, "device": "cpu"}
    damage.run(damage.Config(kind="2:4", out=str(root / "d-24"), **common))
    damage.run(damage.Config(kind="drop-blocks", blocks="0", out=str(root / "d-drop"), **common))
    damage.run(damage.Config(kind="forget", out=str(root / "d-forget"), **common,
                             forget=ForgetConfig(forget_data=str(narrow), forget_steps=10, forget_lr=3e-3,
                                                 forget_eval_every=5, forget_rise=0.0)))
    damage.run(damage.Config(kind="nvfp4", out=str(root / "d-nvfp4"), quant=QuantConfig(scheme="w4a16"), **common))
    return root


def recover_args(root: Path, student: str, out: str, *extra: str, steps: int = 4, lr: str = "3e-3") -> list[str]:
    return ["recover", "--teacher", str(root / "teacher"), "--student", str(root / student), "--out", str(root / out),
            "--data", str(root / "general.txt"), "--seq-len", str(SEQ_LEN), "--steps", str(steps), "--batch-size", "4",
            "--cka-tokens", "64", "--lr", lr, "--eval-every", "2", "--eval-blocks", "8", "--warmup-steps", "0",
            "--device", "cpu", "--no-progress", *extra]


def eval_rows(run: Path) -> list[dict]:
    return read_metrics(run)[1]


def test_pruned_weights_stay_exactly_zero_and_2_4_holds(workdir):
    assert main(recover_args(workdir, "d-24", "r-24", "--loss", "kl+cka", "--batch-size", "8", lr="1e-3")) == 0
    damaged = transformers.AutoModelForCausalLM.from_pretrained(workdir / "d-24")
    # The recovered student is a dense HF directory that transformers loads as it is.
    recovered = transformers.AutoModelForCausalLM.from_pretrained(RunDir(workdir / "r-24").student.root)
    before, after = prunable_linears(damaged), prunable_linears(recovered)
    for name, layer in before.items():
        zero = layer.weight == 0
        w = after[name].weight.detach()
        assert torch.equal(w[zero], torch.zeros_like(w[zero])), name
        assert n_m_violations(w) == 0
        assert not torch.equal(w[~zero], layer.weight[~zero])  # the kept weights trained
    pattern = json.loads(DamageDir(RunDir(workdir / "r-24").student.root).sparsity.read_text())
    assert pattern["is_2_4"] and pattern["zero_fraction"] == pytest.approx(0.5)
    rows = eval_rows(workdir / "r-24")
    assert [r["step"] for r in rows] == [0, 2, 4] and all(r["mask_violations"] == 0 for r in rows)
    assert rows[-1]["kl_per_token"] < rows[0]["kl_per_token"]
    report = json.loads(RecoveryDir(workdir / "r-24").json.read_text())
    curve = report["runs"][0]["recovery"]
    assert curve[0]["kl_per_token"] == 0 and curve[-1]["kl_per_token"] > 0
    assert {c["recovery_of"] for c in report["correlations"]} == {"kl_per_token", "perplexity"}
    for name in (RecoveryDir.MD, RecoveryDir.HTML, RecoveryDir.HEATMAP, RecoveryDir.SCATTER):
        assert (workdir / "r-24" / name).is_file()


def test_forgetting_raises_general_loss_and_recovery_lowers_it(workdir):
    forget = json.loads(DamageDir(workdir / "d-forget").report.read_text())["forget"]
    assert forget["end"]["general_perplexity"] > forget["start"]["general_perplexity"] * 1.2
    assert forget["end"]["narrow_perplexity"] < forget["start"]["narrow_perplexity"]
    assert main(recover_args(workdir, "d-forget", "r-forget", steps=4)) == 0
    rows = eval_rows(workdir / "r-forget")
    assert rows[0]["perplexity"] == pytest.approx(forget["end"]["general_perplexity"], rel=1e-4)
    assert rows[-1]["perplexity"] < rows[0]["perplexity"] * 0.9
    assert "narrow_perplexity" in rows[-1]  # the damage report's narrow corpus is tracked
    # With the narrow CE term the run logs it as `ce` and keeps more of the narrow skill.
    assert main(recover_args(workdir, "d-forget", "r-forget-ce", "--narrow-ce-weight", "1.0", steps=4)) == 0
    train, rows_ce = read_metrics(workdir / "r-forget-ce")
    assert all(r["ce"] is not None for r in train)
    assert rows_ce[-1]["narrow_perplexity"] < rows[-1]["narrow_perplexity"]


def test_removed_block_stays_removed_and_cka_pairs_the_kept_block(workdir):
    # batch 3 of 8 held-out blocks: the last evaluation batch is smaller than a training batch
    assert main(recover_args(workdir, "d-drop", "r-drop", "--loss", "kl+cka", "--batch-size", "3", steps=2)) == 0
    config = yaml.safe_load((workdir / "r-drop" / "config.yaml").read_text())
    assert config["layer_map"] == "0:1"
    student = transformers.AutoModelForCausalLM.from_pretrained(RunDir(workdir / "r-drop").student.root)
    assert num_layers(student) == 1
    report = json.loads(RecoveryDir(workdir / "r-drop").json.read_text())
    assert set(report["runs"][0]["rows"][-1]["cka_layers"]) == {"0"}
    # A recovery run is a distill run: `--resume` reads its config.yaml back and continues it.
    assert main(["recover", "--resume", str(workdir / "r-drop"), "--steps", "3", "--no-progress"]) == 0
    assert [r["step"] for r in eval_rows(workdir / "r-drop")] == [0, 2, 3]


def test_quantized_student_stays_quantized_and_exports(workdir):
    assert main(recover_args(workdir, "d-nvfp4", "r-nvfp4", steps=2)) == 0
    meta = json.loads((RunDir(workdir / "r-nvfp4").student.meta).read_text())
    assert meta["quant"]["format"] == "nvfp4" and meta["quantized"]
    assert ExportDir(workdir / "r-nvfp4" / "export").looks_like_export()


def test_bad_input_is_one_line_exit_2_nothing_written(workdir, capsys):
    other = make_tiny_model(vocab_size=300)
    other.save_pretrained(workdir / "other-vocab")
    make_tiny_tokenizer().save_pretrained(workdir / "other-vocab")
    cases = [(["--student-swap", "other-vocab"], "vocabulary of 300 tokens"),
             (["--keep-mask", "always"], "--keep-mask"),
             (["--student-swap", "d-24", "--narrow-ce-weight", "1"], "needs a narrow corpus"),
             (["--student-swap", "missing"], "does not exist")]
    for extra, message in cases:
        student = extra[1] if extra[0] == "--student-swap" else "d-24"
        extra = extra[2:] if extra[0] == "--student-swap" else extra
        capsys.readouterr()
        assert main(recover_args(workdir, student, "bad", *extra)) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ckaqad")]
        assert len(err) == 1 and err[0].startswith("ckaqad: error:") and message in err[0], (extra, err)
        assert not (workdir / "bad").exists()


def test_recovery_demo_writes_one_report_over_every_run(workdir):
    out = workdir / "demo"
    assert main(["demo", "--recovery", "--recovery-kinds", "2:4", "--teacher", str(workdir / "teacher"),
                 "--data", str(workdir / "general.txt"), "--seq-len", str(SEQ_LEN), "--steps", "2", "--batch-size", "4",
                 "--cka-tokens", "64", "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(RecoveryDir(out).json.read_text())
    assert [(r["damage"], r["loss"]) for r in report["runs"]] == [("2:4", "kl"), ("2:4", "kl+cka")]
    assert (out / "damaged" / "2-4" / DamageDir.REPORT).is_file()
    assert not (out / "runs" / "2-4-kl" / "checkpoints").exists() and RunDir(out / "runs" / "2-4-kl").student.exists()
    assert "### 2:4" in RecoveryDir(out).md.read_text()
