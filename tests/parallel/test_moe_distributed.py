"""FSDP2 on a tiny MoE (qwen3_moe, quantized experts): 2 processes compute what 1 process computes, and the
fused 3-D expert parameters are sharded along the expert axis. Tolerance as tests/parallel/test_distributed.py:
2e-6 absolute on the weights (the same FP32 numbers added in another order), calibration amaxes bitwise equal
(max-reduced over ranks, per-expert vectors included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from moe_distributed_runs import config, make_workdir
from safetensors.torch import load_file

from ckaqad.commands import distill

HERE = Path(__file__).resolve().parent
WEIGHT_ATOL = 2e-6
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    import os

    root = make_workdir(tmp_path_factory.mktemp("moe_distributed"))
    distill.run(config(root, root / "r1"))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])}
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    launch = subprocess.run([str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", "2",
                             str(HERE / "moe_worker.py"), str(root)], env=env, capture_output=True, text=True,
                            timeout=600)  # the shared 2-core machine under load needs it
    assert launch.returncode == 0, launch.stderr[-4000:]
    return root


def test_two_processes_train_the_moe_student_one_process_trains(runs):
    a = load_file(str(runs / "r1" / "student" / "model.safetensors"))
    b = load_file(str(runs / "r2" / "student" / "model.safetensors"))
    assert a.keys() == b.keys()
    experts = [k for k in a if k.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(experts) == 4
    teacher = load_file(str(runs / "teacher" / "model.safetensors"))
    assert not any(k in teacher for k in experts)  # saved per expert by save_pretrained; compare to the student
    assert any(k.endswith("experts.6.up_proj.weight") for k in teacher)  # as a hub MoE checkpoint stores them
    # the 2-process run built both models on meta; each rank read its experts (4 and 3) from those files
    assert a[experts[0]].shape[0] == 7
    assert json.loads((runs / "r2" / "summary.json").read_text())["build"] == "meta"
    assert json.loads((runs / "r1" / "summary.json").read_text())["build"] == "whole"
    diffs = {k: float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point()}
    assert max(diffs.values()) <= WEIGHT_ATOL, sorted(diffs.items(), key=lambda kv: -kv[1])[:4]
    amaxes = [k for k in a if k.endswith("_amax")]
    assert any(a[k].dim() == 1 for k in amaxes)  # per-expert weight amaxes [E]
    assert all(torch.equal(a[k], b[k]) for k in amaxes)
    assert all(bool((a[k] > 0).all()) for k in amaxes if k.endswith("input_amax"))


def test_the_broadcast_load_method_fills_each_ranks_experts_as_from_pretrained(runs):
    """moe_worker.py after the run: the teacher built on meta and sharded (7 experts: 4 rows on rank 0, 3 on rank
    1), filled by rank 0's per-expert broadcasts, gathers to the from_pretrained teacher bit for bit."""
    results = [json.loads((runs / f"broadcast-{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["expert_rows"] for r in results] == [[4], [3]]
    assert all(r["equal"] for r in results)


def test_the_sharded_evaluation_of_the_moe_student_equals_one_process(runs):
    """The final held-out evaluation, scored over 2 ranks (rank 0: batches 0 and 2, rank 1: batch 1) with the
    routing drift's sums merged, against one process scoring all 3 batches."""
    def final(run: Path) -> dict:
        lines = (run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line) for line in lines if json.loads(line)["kind"] == "eval"][-1]

    one, two = final(runs / "r1"), final(runs / "r2")
    for key in ("kl_per_token", "perplexity", "teacher_perplexity", "top1_agreement", "mean_cka", "min_cka",
                "router_jaccard", "router_kl"):
        assert two[key] == pytest.approx(one[key], rel=1e-5), key
    assert 0 < one["router_jaccard"] <= 1 and one["router_kl"] > 0


def test_fsdp2_shards_the_fused_expert_parameters_along_the_experts(tmp_path):
    """FSDP2 over 2 ranks (torch's fake process group: the placements and local shapes, no communication) splits
    the fused [E, ...] expert parameters along the expert axis, 4 experts per rank."""
    import torch.distributed as dist
    from moe_helpers import make_tiny_moe
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from ckaqad.parallel.fsdp import shard_model
    from ckaqad.quant.linear import QuantConfig
    from ckaqad.students.spec import build_ptq_student

    teacher = make_tiny_moe("qwen3_moe")
    student, _ = build_ptq_student(teacher, QuantConfig(scheme="w4a16"), None)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        shard_model(student, "cpu", trainable=True)
        for block in student.model.layers:
            experts = block.mlp.experts
            for name in ("gate_up_proj", "down_proj"):
                param = experts._parameters[name]
                assert [str(p) for p in param.placements] in (["S(0)"], ["Shard(dim=0)"]), name
                assert param.to_local().shape[0] * 2 == param.shape[0] == 8, name
                assert param.to_local().shape[1:] == param.shape[1:], name
    finally:
        dist.destroy_process_group()
