"""`ckaqad rl` end to end on the tiny Llama saved as an HF directory: the run directory, bit-exact resume, the
result usable as a teacher by `ckaqad diagnose`, and bad input as one `ckaqad: error:` line with nothing
written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import save_tiny_teacher
from safetensors.torch import load_file

from ckaqad import cli
from ckaqad.commands import rl
from ckaqad.models.load import load_model
from ckaqad.paths import RLRunDir
from ckaqad.rl.trainer import RLConfig
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.metrics import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("rl") / "teacher"
    save_tiny_teacher(root)
    return root


def config(teacher: Path, out: Path, steps: int = 4, **rl_overrides) -> rl.Config:
    return rl.Config(model=str(teacher), task="arithmetic", device="cpu", out=str(out),
                     rl=RLConfig(**{"steps": steps, "prompts_per_step": 2, "group_size": 4, "max_new_tokens": 6,
                                    "eval_every": 2, "eval_problems": 4, "lr": 1e-3, "beta": 0.01,
                                    "progress": False, **rl_overrides}),
                     checkpoint=CheckpointConfig(save_every=2, keep_last=2))


@pytest.fixture(scope="module")
def straight(teacher, tmp_path_factory) -> RLRunDir:
    out = tmp_path_factory.mktemp("runs") / "straight"
    rl.run(config(teacher, out))
    return RLRunDir(out)


def test_run_directory_holds_metrics_checkpoints_curves_and_an_hf_model(straight):
    train, evals = read_metrics(straight.root)
    assert [r["step"] for r in train] == [1, 2, 3, 4] and [e["step"] for e in evals] == [0, 2, 4]
    watched = {"reward_mean", "reward_std", "entropy", "kl_ref", "completion_length", "clipped", "grpo_unbounded",
               "quadrant_pos_up", "quadrant_pos_down", "quadrant_neg_up", "quadrant_neg_down", "quadrant_zero_adv"}
    assert watched <= set(train[0])
    assert {"heldout_accuracy", "heldout_entropy", "heldout_kl_ref", "heldout_length"} <= set(evals[0])
    assert any(straight.tensorboard.iterdir())
    assert straight.curves.read_bytes()[:8] == PNG_MAGIC
    assert [c.step for c in straight.complete_checkpoints()] == [2, 4]
    summary = json.loads(straight.summary.read_text())
    assert summary["final"] == evals[-1] and summary["algo"] == "abc-grpo"
    assert yaml.safe_load(straight.config.read_text())["group_size"] == 4
    meta = json.loads((straight.model / RLRunDir.RL_META).read_text())
    assert meta["task"] == "arithmetic" and meta["steps"] == 4


def test_the_model_is_the_trained_policy_and_loads_as_a_teacher(straight, teacher):
    loaded = load_model(straight.model, device="cpu")
    trained = loaded.model.state_dict()
    final_checkpoint = load_file(str(straight.complete_checkpoints()[-1].student.weights))
    base = load_model(teacher, device="cpu").model.state_dict()
    assert all(torch.equal(trained[k], final_checkpoint[k]) for k in final_checkpoint)
    assert any(not torch.equal(trained[k], base[k]) for k in base)


def test_diagnose_takes_the_result_as_teacher(straight, tmp_path):
    data = tmp_path / "data.txt"
    data.write_text("\n\n".join(" ".join(f"{i} plus {i + d} is {2 * i + d}." for i in range(60)) for d in range(8)))
    out = tmp_path / "diag"
    code = cli.main(["diagnose", "--teacher", str(straight.model), "--data", str(data), "--seq-len", "32",
                     "--eval-blocks", "4", "--batch-size", "2", "--bootstrap", "0", "--device", "cpu",
                     "--out", str(out)])
    assert code == 0 and any(out.iterdir())


def test_resume_continues_bit_exactly(straight, teacher, tmp_path):
    out = tmp_path / "resumed"
    rl.run(config(teacher, out, steps=2))
    assert cli.main(["rl", "--resume", str(out), "--steps", "4", "--no-progress"]) == 0
    resumed, straight_weights = (load_file(str(RLRunDir(d).model / "model.safetensors"))
                                 for d in (out, straight.root))
    assert resumed.keys() == straight_weights.keys()
    assert all(torch.equal(resumed[k], straight_weights[k]) for k in resumed)

    def comparable(records):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in records]

    assert comparable(read_metrics(out)[0]) == comparable(read_metrics(straight.root)[0])


@pytest.mark.parametrize("flags, message", [
    (["--task", "arithmetc"], "unknown RL task (--task) 'arithmetc' (did you mean: arithmetic?)"),
    (["--algo", "ppo"], "unknown RL algorithm (--algo) 'ppo'"),
    (["--group-size", "1"], "--group-size must be at least 2"),
    (["--eps3", "-0.1"], "--eps3 must be >= 0"),
    (["--minibatches", "9", "--steps", "1"], "--minibatches 9 is more than the 8 completions"),
    (["--eval-problems", "1000"], "--eval-problems 1000: task 'arithmetic' holds 64 held-out problems"),
    (["--model", "/nonexistent/model"], "model path does not exist"),
])
def test_bad_input_is_one_error_line_exit_2_and_nothing_written(teacher, tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    argv = ["rl", "--model", str(teacher), "--device", "cpu", "--out", str(out), "--steps", "1",
            "--max-new-tokens", "2", "--eval-problems", "2", *flags]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckaqad: error: ") and message in err[0]
    assert not out.exists()


def test_nonempty_out_and_missing_resume_are_errors(straight, tmp_path, capsys):
    assert cli.main(["rl", "--out", str(straight.root)]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert cli.main(["rl", "--resume", str(tmp_path / "nothing")]) == 2
    assert "no such run directory" in capsys.readouterr().err
    assert not (tmp_path / "nothing").exists()


def test_progress_lines_without_the_kl_penalty(teacher, tmp_path, capsys):
    """With --beta 0 (the default) the rollout KL is not computed: the step line goes without it."""
    rl.run(config(teacher, tmp_path / "run", steps=1, beta=0.0, progress=True, eval_problems=2))
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("step    0  held-out accuracy") and lines[1].startswith("step    1  reward")
    assert "KL" not in lines[1] and "kl_ref" not in read_metrics(tmp_path / "run")[0][0]
    assert lines[-1].startswith("abc-grpo: held-out accuracy")
