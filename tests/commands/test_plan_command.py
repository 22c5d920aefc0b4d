"""Tests for `ckaqad plan`: the per-rank memory table from a built-in shape, a config.json or a model directory,
the fits verdict and its advice, --json, and one-line errors."""

from __future__ import annotations

import json

import pytest
from conftest import save_tiny_teacher

from ckaqad import cli
from ckaqad.commands import plan
from ckaqad.errors import ConfigError
from ckaqad.parallel.memory import GIB, SHAPES, fewest_gpus


def test_smollm2_fits_one_gpu_and_the_table_lists_every_part(capsys):
    result = plan.run(plan.Config(teacher="smollm2-135m", gpus=1, gpu_memory=80))
    out = capsys.readouterr().out
    for label in ("teacher weights", "student FP32 master shards", "gradients", "AdamW moments",
                  "gathered blocks", "activations, no checkpointing", "activations, activation checkpointing"):
        assert label in out, label
    assert result["fits"] and result["fits_with_checkpointing"] and not result["advice"]
    assert result["plan"]["student_masters"] == SHAPES["smollm2-135m"].parameters * 4


def test_llama_8b_does_not_fit_one_gpu_and_the_advice_says_how_many(capsys):
    result = plan.run(plan.Config(teacher="llama-3.1-8b", gpus=1, gpu_memory=80))
    assert not result["fits"] and not result["fits_with_checkpointing"]
    needed = fewest_gpus(SHAPES["llama-3.1-8b"], 80 * GIB, 8, 256, checkpointing=True)
    assert needed > 1 and any(f"at least {needed} GPUs" in tip for tip in result["advice"])
    assert plan.run(plan.Config(teacher="llama-3.1-8b", gpus=needed, batch_size=8, gpu_memory=80,
                                teacher_sharding="shard"))["fits_with_checkpointing"]
    # ... and does on 8, where each rank holds an eighth of the student's state
    eight = plan.run(plan.Config(teacher="llama-3.1-8b", gpus=8, gpu_memory=80))
    assert eight["fits"]
    assert eight["plan"]["optimizer"] == pytest.approx(result["plan"]["optimizer"] / 8, rel=1e-3)
    assert "does not fit" in capsys.readouterr().out


def test_a_70b_teacher_on_8_gpus_is_sharded_and_needs_more(capsys):
    result = plan.run(plan.Config(teacher="llama-3.1-70b", gpus=8, gpu_memory=80))
    assert result["plan"]["teacher_sharded"]  # auto: 141 GB of bf16 is more than a quarter of a GPU
    assert result["plan"]["teacher"] == pytest.approx(SHAPES["llama-3.1-70b"].parameters * 2 / 8, rel=1e-3)
    assert not result["fits_with_checkpointing"]
    assert any("GPUs" in tip for tip in result["advice"])


def test_a_config_json_and_a_model_directory_give_the_builtin_numbers(tmp_path):
    shape = SHAPES["llama-3.1-8b"]
    config = {"hidden_size": shape.hidden, "intermediate_size": shape.intermediate,
              "num_hidden_layers": shape.layers, "num_attention_heads": shape.heads,
              "num_key_value_heads": shape.kv_heads, "vocab_size": shape.vocab, "tie_word_embeddings": False}
    (tmp_path / "llama.json").write_text(json.dumps(config))
    from_file = plan.run(plan.Config(teacher=str(tmp_path / "llama.json"), gpus=8, json=str(tmp_path / "p.json")))
    builtin = plan.run(plan.Config(teacher="llama-3.1-8b", gpus=8))
    assert from_file["plan"] | {"shape": ""} == builtin["plan"] | {"shape": ""}
    assert json.loads((tmp_path / "p.json").read_text())["plan"]["student_masters"] == \
        builtin["plan"]["student_masters"]
    save_tiny_teacher(tmp_path / "teacher")
    tiny = plan.run(plan.Config(teacher=str(tmp_path / "teacher"), gpus=2, gpu_memory=1))
    assert tiny["shape"]["hidden"] == 64 and tiny["fits"]
    assert tiny["memory_bytes"] == GIB


@pytest.mark.parametrize(("flags", "message"), [
    (["--teacher", "nonesuch"], "neither a built-in shape"),
    (["--gpus", "3", "--batch-size", "8"], "does not split over 3 GPUs"),
    (["--gpu-memory", "0"], "--gpu-memory must be positive"),
    (["--teacher-sharding", "half"], "teacher sharding"),
])
def test_bad_input_is_one_error_line(capsys, flags, message):
    assert cli.main(["plan", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckaqad: error:") and message in err[0]


def test_config_checks_before_any_work():
    with pytest.raises(ConfigError, match="at least 1"):
        plan.Config(gpus=0)


def test_offload_and_bf16_moments_and_the_proposal_are_printed(capsys):
    base = plan.run(plan.Config(teacher="llama-3.1-8b", gpus=1, gpu_memory=80, host_memory=1536))
    lean = plan.run(plan.Config(teacher="llama-3.1-8b", gpus=1, gpu_memory=80, host_memory=1536, cpu_offload=True,
                                optimizer="adamw-bf16"))
    out = capsys.readouterr().out
    assert "in host memory" in out and "AdamW moments (bf16 shards" in out and "held-out evaluation peak" in out
    assert lean["plan"]["optimizer"] < 0.51 * base["plan"]["optimizer"]
    assert lean["fits_with_checkpointing"] and not base["fits_with_checkpointing"]
    # the proposal: one GPU under torchrun (FSDP2 over one rank), activation checkpointing and offload
    assert base["proposal"]["flags"] == ["torchrun --nproc-per-node 1", "--activation-checkpointing", "--cpu-offload"]
    assert "cheapest layout on 1 node(s) of 8 x 80 GiB, 1536 GiB host memory per node: 1 GPU(s)" in out
    # Llama-3.1-70B on one node of 8 x 80 GB with 1.5 TB of host memory: built on meta and evaluated sharded, its
    # offloaded state fits the host; with 256 GB of host memory nothing does
    huge = plan.run(plan.Config(teacher="llama-3.1-70b", gpus=8, gpu_memory=80, host_memory=1536))
    assert huge["proposal"]["offload"] and huge["proposal"]["shard"] and huge["proposal"]["gpus"] <= 8
    small_host = plan.run(plan.Config(teacher="llama-3.1-70b", gpus=8, gpu_memory=80, host_memory=256))
    assert small_host["proposal"] is None and "none fits" in capsys.readouterr().out


@pytest.mark.parametrize(("flags", "message"), [
    (["--optimizer", "lion"], "optimizer"),
    (["--nodes", "0"], "--nodes must be at least 1"),
])
def test_bad_lean_flags_are_one_error_line(capsys, flags, message):
    assert cli.main(["plan", *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ckaqad: error:") and message in err[0]


def test_an_moe_is_planned_built_on_meta_unless_loaded_whole(capsys):
    """Nemotron-3-Nano-30B-A3B on one node of 8 x 80 GB with 1.5 TB of host memory: built on meta (its per-expert
    checkpoint is read expert by expert, parallel/loading.py) it fits 2 GPUs with offload; built whole on every
    rank (`--load-method whole`) nothing does, and the plan says why."""
    lean = dict(teacher="nemotron-3-nano-30b-a3b", gpus=8, gpu_memory=80, host_memory=1536, cpu_offload=True)
    meta = plan.run(plan.Config(**lean))
    assert meta["plan"]["meta_build"] and meta["why_not"] is None
    assert (meta["proposal"]["gpus"], meta["proposal"]["lever"]) == (2, "+ CPU offload")
    whole = plan.run(plan.Config(**lean, load_method="whole"))
    out = capsys.readouterr().out
    assert not whole["plan"]["meta_build"] and whole["proposal"] is None
    assert "built whole on every rank: --load-method whole" in whole["why_not"]
    assert "build peak: whole model, every rank (GPU)" in out and "none fits" in out
    assert cli.main(["plan", "--load-method", "mmap"]) == 2 and "load method" in capsys.readouterr().err
