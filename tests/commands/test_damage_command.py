"""`ckaqad damage` end to end on the tiny teacher: every kind writes a loadable model directory with its damage
report; bad input is one `ckaqad: error:` line, exit 2, and nothing written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from conftest import make_tiny_tokenizer, save_tiny_teacher
from damage_helpers import SEQ_LEN, write_corpora

from ckaqad.cli import main
from ckaqad.damage.pruning import n_m_violations, prunable_linears
from ckaqad.models.arch import num_layers
from ckaqad.paths import DamageDir, detect
from ckaqad.students.spec import load_student

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("damage")
    save_tiny_teacher(root / "teacher")
    write_corpora(root)
    (root / "empty.txt").write_text("\n\n  \n")
    odd = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=259, hidden_size=64, intermediate_size=130, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, bos_token_id=256, eos_token_id=257, pad_token_id=258))
    odd.save_pretrained(root / "odd")
    make_tiny_tokenizer().save_pretrained(root / "odd")
    return root


def damage_args(root: Path, kind: str, out: str, *extra: str) -> list[str]:
    return ["damage", "--kind", kind, "--teacher", str(root / "teacher"), "--out", str(root / out),
            "--data", str(root / "general.txt"), "--seq-len", str(SEQ_LEN), "--eval-blocks", "4", "--device", "cpu",
            *extra]


@pytest.mark.parametrize(("kind", "extra"), [
    ("magnitude", ["--sparsity", "0.6"]),
    ("wanda", []),
    ("2:4", ["--score", "magnitude"]),
    ("drop-blocks", ["--drop", "1", "--importance", "kl"]),
    ("forget", ["--forget-steps", "4", "--forget-eval-every", "2", "--forget-lr", "1e-3"]),
    ("nvfp4", ["--scheme", "w4a16"]),
])
def test_every_kind_writes_a_model_and_a_report(workdir, kind, extra):
    out = f"out-{kind.replace(':', '-')}"
    if kind == "forget":
        extra = [*extra, "--forget-data", str(workdir / "narrow.txt")]
    assert main(damage_args(workdir, kind, out, *extra)) == 0
    target = DamageDir(workdir / out)
    report = json.loads(target.report.read_text())
    assert report["kind"] == kind and report["schema"] == "ckaqad.damage/1"
    assert report["fidelity"]["kl_per_token"] > 0 and target.report_md.is_file()
    teacher = transformers.AutoModelForCausalLM.from_pretrained(workdir / "teacher")
    student = load_student(target.root, teacher).model
    if kind == "nvfp4":
        assert detect(target.root) == "student"
        return
    assert detect(target.root) == "model"  # an ordinary HF directory
    if kind in ("magnitude", "wanda", "2:4"):
        zeros = [float((layer.weight == 0).float().mean()) for layer in prunable_linears(student).values()]
        assert zeros == pytest.approx([{"magnitude": 0.6}.get(kind, 0.5)] * len(zeros), abs=0.01)
        assert sorted(report["masked_layers"]) == sorted(prunable_linears(student))
        assert json.loads(target.sparsity.read_text())["is_2_4"] == (kind == "2:4")
        if kind == "2:4":
            assert all(n_m_violations(layer.weight) == 0 for layer in prunable_linears(student).values())
    if kind == "drop-blocks":
        assert num_layers(student) == 1 and report["layer_map"] == f"0:{report['depth']['kept'][0]}"
        assert len(report["depth"]["scores"]) == 2
    if kind == "forget":
        history = report["forget"]["history"]
        assert [h["step"] for h in history] == [0, 2, 4]
        assert history[-1]["narrow_perplexity"] < history[0]["narrow_perplexity"]  # it learnt the narrow task
        changed = any(not torch.equal(a, b) for a, b in zip(student.state_dict().values(),
                                                            teacher.state_dict().values(), strict=False))
        assert changed


@pytest.mark.parametrize(("kind", "extra", "message"), [
    ("magnitude", ["--sparsity", "1.0"], "strictly between 0 and 1"),
    ("wanda", ["--sparsity", "0"], "strictly between 0 and 1"),
    ("drop-blocks", ["--blocks", "2"], "out of range"),
    ("drop-blocks", ["--blocks", "0,1"], "removes every one"),
    ("drop-blocks", ["--drop", "2"], "--drop must be between 1 and 1"),
    ("drop-blocks", [], "exactly one of --blocks"),
    ("forget", ["--forget-data", "EMPTY"], "no text found"),
    ("forget", [], "needs --forget-data"),
    ("2:4", ["--teacher", "ODD"], "divisible by 4"),
    ("pruning", [], "unknown damage kind"),
])
def test_bad_input_is_one_line_exit_2_nothing_written(workdir, capsys, kind, extra, message):
    extra = [str(workdir / "empty.txt") if e == "EMPTY" else str(workdir / "odd") if e == "ODD" else e for e in extra]
    capsys.readouterr()
    assert main(damage_args(workdir, kind, "bad", *extra)) == 2
    # transformers' own "Loading weights" bar also writes to stderr; ckaqad writes exactly one line
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ckaqad")]
    assert len(err) == 1 and err[0].startswith("ckaqad: error:") and message in err[0], err
    assert not (workdir / "bad").exists()
    assert not any(p.name.startswith(".bad") for p in workdir.iterdir())
