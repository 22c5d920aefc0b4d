"""Single-process tests of ckaqad.parallel and the rank-aware pieces of data/ and capture/: the global batch is
the union of the rank slices in order, the CKA rows of every rank are the global rows, the planner's shapes
count what transformers builds, and the torchrun switch leaves a plain process alone."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

from ckaqad.capture import rank_rows, select_rows, valid_token_mask
from ckaqad.data.blocks import rank_slice, train_batches
from ckaqad.errors import ConfigError, DataError, LostPeerError, TrainingError
from ckaqad.objectives.kl import chunked_kl
from ckaqad.parallel import dist as pdist
from ckaqad.parallel.config import ParallelConfig
from ckaqad.parallel.fsdp import choose_teacher_sharding
from ckaqad.parallel.memory import (
    SHAPES,
    LlamaShape,
    plan_memory,
    propose,
    resolve_shape,
    shard_elements,
    why_not,
)

BLOCKS = torch.arange(40 * 8).view(40, 8)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_rank_slices_in_rank_order_are_the_global_batch(world):
    # N ranks x b blocks see exactly what one process of N*b blocks sees, at every step (epochs included)
    for step, batch in zip(range(12), train_batches(BLOCKS, 8, seed=3), strict=False):
        slices = [rank_slice(batch, r, world) for r in range(world)]
        assert torch.equal(torch.cat([s["input_ids"] for s in slices]), batch["input_ids"]), step
        assert all(s["input_ids"].shape[0] == 8 // world for s in slices)


def test_a_batch_that_does_not_split_is_a_data_error():
    batch = next(train_batches(BLOCKS, 6, seed=0))
    with pytest.raises(DataError, match="multiple of the number of processes"):
        rank_slice(batch, 0, 4)


@pytest.mark.parametrize("world", [2, 4])
def test_every_ranks_cka_rows_are_its_share_of_the_global_rows(world):
    ids = torch.randint(0, 50, (8, 16), generator=torch.Generator().manual_seed(0))
    ids[3, 5] = 0  # an excluded token id
    mask = valid_token_mask(ids, None, n_sink=1, exclude_token_ids=(0,))
    rows = select_rows(mask, 37, torch.Generator().manual_seed(11))
    per_rank = (8 // world) * 16
    shares, counts = zip(*(rank_rows(rows, r, world, per_rank) for r in range(world)), strict=True)
    assert all(c == list(counts[0]) for c in counts)  # every rank knows every rank's count
    assert sum(counts[0]) == rows.numel() == 37
    # mapped back to global positions, the shares in rank order are the global rows
    back = torch.cat([share + r * per_rank for r, share in enumerate(shares)])
    assert torch.equal(back, rows)
    # each share indexes the rank's own slice: the same tokens as the global rows pick
    for r, share in enumerate(shares):
        local = ids[r * (8 // world):(r + 1) * (8 // world)].flatten()
        assert torch.equal(local[share], ids.flatten()[rows[rows // per_rank == r]])
    # a pure function of (seed, step, micro): the same generator seed gives the same rows
    assert torch.equal(select_rows(mask, 37, torch.Generator().manual_seed(11)), rows)


def test_a_plain_process_has_no_process_group(monkeypatch):
    for name in pdist.TORCHRUN_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    world, created = pdist.init_world("cpu", 10.0)
    assert world == pdist.World() and not created and not world.distributed and world.is_main
    assert world.device("cpu") == "cpu"
    assert not pdist.launched_by_torchrun()
    assert pdist.launched_by_torchrun({"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "MASTER_ADDR": "h",
                                       "MASTER_PORT": "1"})
    # the collectives are the identity without a group
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(pdist.all_reduce_(t.clone()), t)
    assert pdist.broadcast_text("x") == "x"


def test_a_failed_collective_becomes_one_lost_peer_error_line():
    world = pdist.World(rank=1, size=2)
    error = pdist.lost_peer_error(world, RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:1234\nmore"))
    assert isinstance(error, LostPeerError) and isinstance(error, TrainingError)
    assert str(error).startswith("rank 1 of 2: lost contact with the other processes ([gloo] Connection closed")
    assert "\n" not in str(error) and "--resume" in str(error)
    assert pdist.is_collective_failure(RuntimeError("Connection reset by peer"))
    assert not pdist.is_collective_failure(ValueError("Connection closed by peer"))
    assert not pdist.is_collective_failure(RuntimeError("shape mismatch"))


def test_parallel_config_checks_its_flags():
    with pytest.raises(ConfigError, match="teacher sharding"):
        ParallelConfig(teacher_sharding="half")
    with pytest.raises(ConfigError, match="--dist-timeout must be positive"):
        ParallelConfig(dist_timeout=0)


def test_teacher_sharding_auto_replicates_up_to_a_quarter_of_a_rank():
    assert choose_teacher_sharding("auto", 20 * 2**30, 80 * 2**30) == "replicate"
    assert choose_teacher_sharding("auto", 21 * 2**30, 80 * 2**30) == "shard"
    assert choose_teacher_sharding("replicate", 200 * 2**30, 80 * 2**30) == "replicate"
    assert choose_teacher_sharding("shard", 1, 80 * 2**30) == "shard"


# ------------------------------------------------------------------------------------------------ planner


@pytest.mark.parametrize(("rows", "world"), [(259, 2), (7, 4), (3, 8), (64, 2), (1, 3)])
def test_shard_elements_are_torch_chunk_sizes(rows, world):
    chunks = torch.chunk(torch.empty(rows, 5), world)
    for rank in range(world):
        want = chunks[rank].numel() if rank < len(chunks) else 0
        assert shard_elements((rows, 5), world, rank) == want
    assert sum(shard_elements((rows, 5), world, r) for r in range(world)) == rows * 5


@pytest.mark.parametrize("tied", [True, False])
def test_shape_counts_what_transformers_builds(tied):
    config = transformers.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied)
    model = transformers.LlamaForCausalLM(config)
    shape = LlamaShape.from_config(config.to_dict(), "tiny")
    assert shape.parameters == sum(p.numel() for p in model.parameters())
    assert sorted(shape.parameter_shapes()) == sorted(tuple(p.shape) for p in model.parameters())


def test_builtin_shapes_have_the_published_parameter_counts():
    assert SHAPES["llama-3.1-8b"].parameters == 8_030_261_248
    assert SHAPES["llama-3.1-70b"].parameters == 70_553_706_496
    assert SHAPES["smollm2-135m"].parameters == 134_515_008
    assert resolve_shape("default") == SHAPES["smollm2-135m"]
    with pytest.raises(ConfigError, match="neither a built-in shape"):
        resolve_shape("llama-9000")


def test_sharding_divides_the_student_state_and_checkpointing_the_activations():
    shape = SHAPES["llama-3.1-8b"]
    one = plan_memory(shape, 1, 8, 1024, teacher_sharded=False)
    eight = plan_memory(shape, 8, 8, 1024, teacher_sharded=True)
    assert one.student_masters == shape.parameters * 4
    assert math.isclose(eight.student_masters * 8, one.student_masters, rel_tol=1e-4)
    assert math.isclose(eight.teacher * 8, one.teacher, rel_tol=1e-4)
    # frozen high-precision tensors (the default) carry no gradient or AdamW state
    trained = shape.layers * shape.block_linear_parameters
    assert one.gradients == trained * 4 and one.optimizer == trained * 8 + 4 * shape.layers * 7
    assert plan_memory(shape, 1, 8, 1024, False, train_high_precision=True).gradients == shape.parameters * 4
    assert one.activations_checkpointed < one.activations / 10
    assert eight.tokens_per_rank == 1024 and one.tokens_per_rank == 8 * 1024


def test_chunked_kl_takes_the_global_token_count_as_its_divisor():
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 5, 9, generator=g), torch.randn(2, 5, 9, generator=g)
    mask = torch.ones(2, 5)
    mean = chunked_kl(s, t, mask)
    # this rank's share when the global batch holds three times its 10 tokens
    assert torch.allclose(chunked_kl(s, t, mask, count=torch.tensor(30.0)), mean / 3, rtol=1e-6)
    assert torch.equal(chunked_kl(s, t, mask, count=torch.tensor(10.0)), mean)


def test_bench_step_distributed_mode_in_one_process(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step_distributed", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_step_distributed", bench)
    spec.loader.exec_module(bench)
    payload = bench.main(["--distributed", "--quick"])
    assert [r["loss"] for r in payload["results"]] == ["kl", "kl+cka"]
    for r in payload["results"]:
        assert r["processes"] == 1 and r["tokens_per_s"] == pytest.approx(2 * 32 / (r["step_ms"] / 1e3))
        assert r["ranks"][0]["peak_mb"] > 0 and r["ranks"][0]["state_mb"] > 0
    assert "QAD step across processes (FSDP2)" in capsys.readouterr().out


def test_moe_shapes_count_what_transformers_builds():
    """An MoE config.json (Qwen3-MoE: fused 3-D experts, q/k norms) gives the parameters transformers builds."""
    config = transformers.Qwen3MoeConfig(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                         num_experts=4, num_experts_per_tok=2, tie_word_embeddings=False)
    shape = LlamaShape.from_config(config.to_dict(), "tiny-moe")
    assert shape.experts == 4 and shape.experts_per_token == 2 and shape.qk_norm
    assert shape.parameters == sum(p.numel() for p in transformers.Qwen3MoeForCausalLM(config).parameters())


def test_builtin_moe_and_hybrid_shapes_have_the_published_parameter_counts():
    # model cards: Qwen3-4B 4.0B, Qwen3-30B-A3B 30.5B, gpt-oss-20b 20.9B (biases and sinks left out: < 0.01 %),
    # Nemotron 3 Nano 31.6B (the paper's count)
    assert SHAPES["qwen3-4b"].parameters == 4_022_468_096
    assert round(SHAPES["qwen3-30b-a3b"].parameters / 1e9, 1) == 30.5
    assert round(SHAPES["gpt-oss-20b"].parameters / 1e9, 1) == 20.9
    nano = SHAPES["nemotron-3-nano-30b-a3b"]
    assert round(nano.parameters / 1e9, 1) == 31.6 and len(nano.block_kinds) == nano.layers == 52
    assert nano.block_kinds.count("E") == 23 and nano.block_kinds.count("M") == 23 and nano.block_kinds.count("*") == 6
    # the routers stay in high precision; every expert's weights are quantized and train
    assert sum(math.prod(s) for s in SHAPES["qwen3-30b-a3b"].quantized_shapes()) == \
        48 * (128 * 3 * 768 * 2048 + 2 * 4096 * 2048 + 2 * 512 * 2048)


def test_offload_moves_the_training_state_to_the_host_and_bf16_moments_halve_it():
    shape = SHAPES["llama-3.1-70b"]
    plain = plan_memory(shape, 8, 8, 256, teacher_sharded=True)
    offload = plan_memory(shape, 8, 8, 256, teacher_sharded=True, offload=True)
    lean = plan_memory(shape, 8, 8, 256, teacher_sharded=True, optimizer="adamw-bf16")
    # the step peaks at the larger of the saved activations and the gradients (here the gradients); offloaded,
    # the gradients leave the GPU and the activations are what is left
    assert plain.gradients > plain.activations_checkpointed
    assert plain.total(True) - offload.total(True) == plain.state - plain.activations_checkpointed
    assert plain.state == offload.host_state and plain.host_state == 0
    # rank 0's host peak: the runtime and the offloaded state beside one file of the final student being written
    assert offload.host_per_rank() == offload.runtime + offload.state + offload.host_write_peak
    assert offload.host_per_rank(rank=1) == offload.runtime + max(offload.host_build_peak, offload.state)
    steps = 4 * len(shape.quantized_shapes())  # one float32 step per tensor
    assert lean.optimizer - steps == (plain.optimizer - steps) // 2
    # the meta build: the rank's shards of teacher and FP32 student and its slice of one 5 GB weight file
    assert plain.build_peak == plain.teacher + plain.student_masters + 5 * 10**9 // 8 < shape.parameters
    # the sharded evaluation gathers one student block (bf16) and its quantized copy at a time; the gathered one
    # (before it) the whole student and a bf16 quantized copy of its weights on every rank
    quantized = sum(math.prod(s) for s in shape.quantized_shapes())
    root = sum(math.prod(s) for s in shape.root_shapes())
    teacher_blocks = (2 * shape.block_parameters + root) * 2
    state = plain.teacher + plain.student_masters + plain.optimizer
    assert plain.eval_peak == state + 2 * (shape.block_parameters + root) + 2 * shape.block_linear_parameters \
        + teacher_blocks + 2 * plain.logits // 3
    gathers = plan_memory(shape, 8, 8, 256, teacher_sharded=True, eval_gathers=True)
    assert gathers.eval_peak == state + 2 * shape.parameters + 2 * quantized + teacher_blocks + 2 * plain.logits // 3
    assert offload.eval_peak == plain.eval_peak - plain.student_masters - plain.optimizer
    gathers_offload = plan_memory(shape, 8, 8, 256, teacher_sharded=True, eval_gathers=True, offload=True)
    assert why_not(gathers_offload, 80 * 2**30, True, None, 8).startswith("the held-out evaluation needs")
    assert why_not(offload, 80 * 2**30, True, None, 8) is None  # what the sharded evaluation changes
    assert why_not(plain, 80 * 2**30, True, None, 8).startswith("training needs")


def test_a_cpu_rank_peaks_the_same_offloaded_or_not_and_rank_0_holds_the_most():
    """On CPU the device is the host: --cpu-offload moves nothing, so the planner's RSS is the same."""
    shape = LlamaShape("random-1b", 2048, 8192, 16, 32, 8, 259, tied=False)
    for checkpointing in (False, True):
        plans = [plan_memory(shape, 2, 2, 64, teacher_sharded=True, compute_bytes=4, teacher_bytes=4, offload=offload,
                             optimizer="adamw-bf16") for offload in (False, True)]
        assert plans[0].cpu_rank_peak(checkpointing) == plans[1].cpu_rank_peak(checkpointing)
        assert plans[0].cpu_rank_peak(checkpointing, rank=1) <= plans[0].cpu_rank_peak(checkpointing)
    plain = plans[0]
    # with checkpointing the step is the peak: the state, the gradients, the working set, the runtime
    assert plain.cpu_rank_peak(True, rank=1) == plain.runtime + plain.total(True) > plain.runtime + plain.eval_peak


def test_the_proposal_takes_the_fewest_gpus_then_the_first_lever_that_fits():
    four_b = propose(SHAPES["qwen3-4b"], 80 * 2**30, 8, 256, 8, 1, 1536 * 2**30)
    assert (four_b.gpus, four_b.lever) == (1, "activation checkpointing")
    assert [t[:2] for t in four_b.tried] == [(1, "nothing")] and "training needs" in four_b.tried[0][2]
    eight_b = propose(SHAPES["llama-3.1-8b"], 80 * 2**30, 8, 256, 8, 1, 1536 * 2**30)
    # one GPU holds Llama-3.1-8B once its training state lives in host memory (FSDP2 over one rank)
    assert (eight_b.gpus, eight_b.lever) == (1, "+ CPU offload") and not eight_b.settings["shard"]
    assert [t[1] for t in eight_b.tried] == ["nothing", "activation checkpointing", "+ bf16 AdamW moments"]
    # a tiny host memory rules out every layout that keeps the whole teacher on the host while loading
    assert propose(SHAPES["llama-3.1-8b"], 80 * 2**30, 8, 256, 8, 1, 1 * 2**30) is None


def test_a_mixture_of_experts_is_planned_built_on_meta_and_whole_only_when_asked():
    """distill builds an MoE teacher stored one expert at a time on meta (parallel.loading reads each rank's
    experts), so the plan does by default; `meta_build=False` (`--load-method whole`) plans every rank whole."""
    nano = SHAPES["nemotron-3-nano-30b-a3b"]
    whole = plan_memory(nano, 8, 8, 256, teacher_sharded=True, offload=True, meta_build=False)
    meta = plan_memory(nano, 8, 8, 256, teacher_sharded=True, offload=True)
    assert meta.meta_build and not whole.meta_build
    assert whole.build_peak == nano.parameters * 6 and whole.host_build_peak == nano.parameters * 2
    assert meta.build_peak == meta.teacher + 5 * 10**9 // 8 < whole.build_peak // 10
    assert "built whole on every rank: --load-method whole" in why_not(whole, 80 * 2**30, True, None, 8)
    assert why_not(meta, 80 * 2**30, True, None, 8) is None
