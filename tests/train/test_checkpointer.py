"""Tests for `ckaqad.train.checkpointer`: exact save/load round trip, no pickle, keep-k pruning, the completion marker
and what a reader sees after an interrupted write, and clear errors for damaged or foreign checkpoints."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from ckaqad.errors import CheckpointError, ConfigError, DiskFullError
from ckaqad.paths import COMPLETE_MARKER, CheckpointDir, RunDir
from ckaqad.quant.apply import calibrate, quantize_model_
from ckaqad.quant.linear import QuantConfig
from ckaqad.train import checkpointer as ckpt
from ckaqad.train.checkpointer import CheckpointConfig, CheckpointManager

step_dir_name = CheckpointDir.name_for


def latest_checkpoint(root):
    """The newest complete step dir under a run's `checkpoints/` directory `root`."""
    latest = RunDir(root.parent).latest_checkpoint()
    return None if latest is None else latest.root

VOCAB = 259  # the tiny tokenizer's vocabulary (conftest)


def batch(seed: int, rows: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    ids = torch.randint(0, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def make_training(teacher, lr: float = 1e-3):
    """(student, optimizer, scheduler) as distill.build_run makes them: calibrated W4A4 student, AdamW, LambdaLR."""
    student = copy.deepcopy(teacher).float()
    quantize_model_(student, QuantConfig())
    calibrate(student, [batch(100), batch(101)])
    student.train()
    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01, betas=(0.9, 0.95))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (step + 1))
    return student, optimizer, scheduler


def train_steps(student, optimizer, scheduler, seeds) -> None:
    for seed in seeds:
        student(**batch(seed)).logits.float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()


def save(manager: CheckpointManager, step: int, student, optimizer, scheduler, extra: dict | None = None):
    return manager.save(step, student, optimizer, scheduler, extra=extra)


def state_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def trained(tiny_model):
    """A student with 3 optimizer steps behind it, so AdamW has non-trivial exp_avg / exp_avg_sq / step."""
    student, optimizer, scheduler = make_training(tiny_model)
    train_steps(student, optimizer, scheduler, seeds=(1, 2, 3))
    return tiny_model, student, optimizer, scheduler


# ------------------------------------------------------------------------------------------------ config


@pytest.mark.parametrize("kwargs", [{"save_every": 0}, {"save_every": -3}, {"keep_last": 0}, {"keep_last": -1}])
def test_config_rejects_values_below_one(kwargs):
    with pytest.raises(ConfigError, match="--save-every and --keep-last must be at least 1"):
        CheckpointConfig(**kwargs)


def test_save_policy_interval_and_last_step(tmp_path):
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=3))
    assert [s for s in range(1, 11) if manager.should_save(s, last_step=10)] == [3, 6, 9, 10]
    assert step_dir_name(7) == "step-000007"
    assert manager.root == tmp_path / "checkpoints"


# ---------------------------------------------------------------------------------------------- round trip


def test_round_trip_restores_everything_exactly(tmp_path, trained):
    teacher, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1))
    counters = {"data_position": 12, "bad_in_a_row": 1, "tokens_seen": 3 * 2 * 16}
    step_dir = save(manager, 3, student, optimizer, scheduler, extra=counters)
    assert step_dir == tmp_path / "checkpoints" / "step-000003"
    assert manager.latest() == step_dir
    after_save = torch.rand(8)  # the RNG stream right after the save

    fresh, fresh_opt, fresh_sched = make_training(teacher)
    assert not state_equal(fresh.state_dict(), student.state_dict())  # the load below has work to do
    state = manager.load(fresh, fresh_opt, fresh_sched)

    # loop counters
    assert state["step"] == 3
    assert {k: state[k] for k in counters} == counters
    # RNG: the stream continues from the save point
    assert torch.equal(torch.rand(8), after_save)
    # weights and calibrated amax buffers
    assert state_equal(fresh.state_dict(), student.state_dict())
    # optimizer: every per-parameter tensor (exp_avg, exp_avg_sq, step) and the param groups
    orig, back = optimizer.state_dict(), fresh_opt.state_dict()
    assert orig["state"].keys() == back["state"].keys() and len(orig["state"]) > 0
    for index, entries in orig["state"].items():
        assert set(entries) == {"step", "exp_avg", "exp_avg_sq"}
        assert float(entries["step"]) == 3.0
        for name, value in entries.items():
            assert torch.equal(back["state"][index][name], value), (index, name)
    assert [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in orig["param_groups"]] == \
        [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in back["param_groups"]]
    # scheduler
    assert fresh_sched.last_epoch == scheduler.last_epoch == 3
    assert fresh_sched.get_last_lr() == scheduler.get_last_lr() == [pytest.approx(1e-3 / 4)]

    # Continuing both gives bit-identical weights: nothing the next steps depend on was lost.
    train_steps(student, optimizer, scheduler, seeds=(4, 5))
    train_steps(fresh, fresh_opt, fresh_sched, seeds=(4, 5))
    assert state_equal(fresh.state_dict(), student.state_dict())


def test_files_are_safetensors_and_json_only(tmp_path, trained):
    _, student, optimizer, scheduler = trained
    step_dir = save(CheckpointManager(tmp_path, CheckpointConfig()), 3, student, optimizer, scheduler)
    files = sorted(str(p.relative_to(step_dir)) for p in step_dir.rglob("*") if p.is_file())
    assert files == ["COMPLETE", "optimizer.safetensors", "rng.safetensors", "state.json",
                     "student/ckaqad_student.json", "student/config.json", "student/model.safetensors"]
    assert not [f for f in files if f.endswith((".pt", ".pth", ".bin", ".pkl", ".pickle"))]
    # and each reads back without pickle
    for name in ("optimizer.safetensors", "rng.safetensors", "student/model.safetensors"):
        assert load_file(str(step_dir / name))
    state = json.loads((step_dir / "state.json").read_text())
    assert state["step"] == 3 and "scheduler" in state and "param_groups" in state["optimizer"]
    assert (step_dir / COMPLETE_MARKER).read_text() == "3"
    opt_tensors = load_file(str(step_dir / "optimizer.safetensors"))
    n_params = len(optimizer.param_groups[0]["params"])
    assert {k.rsplit(".", 1)[1] for k in opt_tensors} == {"step", "exp_avg", "exp_avg_sq"}
    assert len(opt_tensors) == 3 * n_params


# --------------------------------------------------------------------------------------- keep-k, discovery


def test_keep_last_prunes_old_step_dirs(tmp_path, trained):
    _, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1, keep_last=2))
    for step in (1, 2, 3, 4, 5):
        save(manager, step, student, optimizer, scheduler)
        kept = sorted(p.name for p in manager.root.iterdir())
        assert kept == [step_dir_name(s) for s in range(max(1, step - 1), step + 1)]
    assert manager.latest().name == "step-000005"


def test_latest_orders_steps_numerically_not_by_name(tmp_path):
    root = tmp_path / "checkpoints"
    for name in ("step-9", "step-10", "step-000002"):
        (root / name).mkdir(parents=True)
        (root / name / COMPLETE_MARKER).write_text("")
    assert RunDir(tmp_path).latest_checkpoint().root.name == "step-10"
    assert RunDir(tmp_path / "nowhere").latest_checkpoint() is None


def test_latest_ignores_step_dir_without_marker(tmp_path, trained):
    _, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1, keep_last=5))
    good = save(manager, 2, student, optimizer, scheduler)
    # A step dir whose writer died before the marker (e.g. copied by hand, or a non-atomic writer).
    half = manager.root / step_dir_name(4)
    half.mkdir()
    (half / "state.json").write_text(json.dumps({"step": 4}))
    assert manager.latest() == good
    # pruning only counts complete checkpoints, so the good one survives keep_last=1
    manager.config = CheckpointConfig(keep_last=1)
    manager._prune()
    assert good.is_dir()


def test_interrupted_save_leaves_previous_checkpoint(tmp_path, trained, monkeypatch):
    teacher, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1, keep_last=3))
    good = save(manager, 3, student, optimizer, scheduler, extra={"marker": "good"})
    good_weights = {k: v.clone() for k, v in student.state_dict().items()}
    train_steps(student, optimizer, scheduler, seeds=(4,))

    def disk_full():  # fails after the student and optimizer files were written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ckpt, "rng_state", disk_full)
    with pytest.raises(DiskFullError, match="no space left.*step-000004"):
        save(manager, 4, student, optimizer, scheduler)
    monkeypatch.undo()

    # Nothing half-written is visible: no step-4 dir and no temp dir left behind.
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-000003"]
    assert manager.latest() == good
    fresh, fresh_opt, fresh_sched = make_training(teacher)
    state = manager.load(fresh, fresh_opt, fresh_sched)
    assert state["step"] == 3 and state["marker"] == "good"
    assert state_equal(fresh.state_dict(), good_weights)


def test_interrupted_save_by_keyboard_interrupt(tmp_path, trained, monkeypatch):
    _, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1))
    good = save(manager, 1, student, optimizer, scheduler)
    real = ckpt.save_file
    calls = []

    def killed_on_second_file(tensors, path, *args, **kwargs):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", killed_on_second_file)
    with pytest.raises(KeyboardInterrupt):
        save(manager, 2, student, optimizer, scheduler)
    assert calls[0].endswith("optimizer.safetensors") and "/.step-000002.tmp-" in calls[0]
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-000001"]
    assert manager.latest() == good


def test_stale_temp_dir_of_a_killed_writer_is_ignored_then_removed(tmp_path, trained):
    _, student, optimizer, scheduler = trained
    manager = CheckpointManager(tmp_path, CheckpointConfig(save_every=1, keep_last=3))
    good = save(manager, 1, student, optimizer, scheduler)
    # what SIGKILL mid-write leaves: the temp dir, with everything but the marker
    stale = manager.root / ".step-000002.tmp-dead"
    stale.mkdir()
    (stale / "state.json").write_text("{}")
    assert manager.latest() == good
    save(manager, 3, student, optimizer, scheduler)
    assert sorted(p.name for p in manager.root.iterdir()) == ["step-000001", "step-000003"]


# ------------------------------------------------------------------------------------------------ errors


def test_load_without_checkpoint_is_checkpoint_error(tmp_path, trained):
    _, student, optimizer, scheduler = trained
    with pytest.raises(CheckpointError, match="no complete checkpoint under"):
        CheckpointManager(tmp_path, CheckpointConfig()).load(student, optimizer, scheduler)


@pytest.mark.parametrize("damage", ["truncated_optimizer", "garbage_weights", "bad_json", "missing_rng"])
def test_damaged_checkpoint_is_checkpoint_error(tmp_path, trained, damage):
    teacher, student, optimizer, scheduler = trained
    step_dir = save(CheckpointManager(tmp_path, CheckpointConfig()), 3, student, optimizer, scheduler)
    if damage == "truncated_optimizer":
        data = (step_dir / "optimizer.safetensors").read_bytes()
        (step_dir / "optimizer.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage_weights":
        (step_dir / "student" / "model.safetensors").write_bytes(b"not a safetensors file")
    elif damage == "bad_json":
        (step_dir / "state.json").write_text('{"step": 3, "sched')
    else:
        (step_dir / "rng.safetensors").unlink()
    fresh, fresh_opt, fresh_sched = make_training(teacher)
    before = {k: v.clone() for k, v in fresh.state_dict().items()}
    rng_before = torch.get_rng_state()
    with pytest.raises(CheckpointError, match=r"step-000003 is damaged and cannot be read"):
        CheckpointManager(tmp_path, CheckpointConfig()).load(fresh, fresh_opt, fresh_sched)
    assert state_equal(fresh.state_dict(), before)  # nothing half-loaded
    assert fresh_opt.state_dict()["state"] == {}
    assert torch.equal(torch.get_rng_state(), rng_before)


def small_llama(hidden: int = 64, layers: int = 2) -> transformers.LlamaForCausalLM:
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(5)
    return transformers.LlamaForCausalLM(config).float().eval()


@pytest.mark.parametrize(("hidden", "layers", "expected"), [
    (32, 2, r"shape \['lm_head.weight \(259, 64\) vs \(259, 32\)"),
    (64, 3, r"missing \['model.layers.2.self_attn.q_proj.weight'"),
])
def test_checkpoint_of_another_model_is_checkpoint_error(tmp_path, trained, hidden, layers, expected):
    _, student, optimizer, scheduler = trained
    save(CheckpointManager(tmp_path, CheckpointConfig()), 3, student, optimizer, scheduler)
    other, other_opt, other_sched = make_training(small_llama(hidden, layers))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"step-000003: weights do not fit the student") as info:
        CheckpointManager(tmp_path, CheckpointConfig()).load(other, other_opt, other_sched)
    assert info.match(expected)
    assert state_equal(other.state_dict(), before)  # checked before loading anything


def test_optimizer_of_another_shape_is_checkpoint_error(tmp_path, trained):
    teacher, student, optimizer, scheduler = trained
    save(CheckpointManager(tmp_path, CheckpointConfig()), 3, student, optimizer, scheduler)
    fresh, _, _ = make_training(teacher)
    partial = torch.optim.AdamW(list(fresh.parameters())[:3], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(partial, lambda step: 1.0)
    with pytest.raises(CheckpointError, match="the optimizer state does not fit the student"):
        CheckpointManager(tmp_path, CheckpointConfig()).load(fresh, partial, sched)
