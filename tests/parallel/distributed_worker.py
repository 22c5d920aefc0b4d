"""The distributed half of tests/parallel/test_distributed.py, one torchrun launch for every check that needs
two processes (startup costs more than the checks):

    torchrun --standalone --nproc-per-node 2 tests/parallel/distributed_worker.py WORKDIR

WORKDIR holds teacher/, data.txt and r1_cut/ (a one-process run cut after its step-2 checkpoint), made by the
test. Each rank writes WORKDIR/worker-RANK.json with what it measured; the runs it trains land in WORKDIR:
    r2/          4 steps at 2 processes, teacher sharded, activation checkpointing (built on meta, DCP reads)
    r2_cut2/     r2 cut after step 2, resumed at 2 processes (teacher replicated, no checkpointing; built
                 whole per rank, as before the meta build)
    r1_cut/      the one-process run resumed at 2 processes
    r2_lean/     issue 20's flags (one block per rank) with bf16 AdamW moments and --cpu-offload (built on
                 meta, filled by rank 0's broadcasts)
    streamed/    the sharded student of the memory check, streamed by both ranks into shards of 64 KiB
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from distributed_runs import LEAN, SMALL_SHARD_BYTES, config, cut_at

from ckaqad.cka import CKAAccumulator, all_reduce_accumulator_, distributed_linear_cka, linear_cka
from ckaqad.commands import distill
from ckaqad.data.blocks import train_batches
from ckaqad.objectives.base import ForwardOutputs
from ckaqad.objectives.ce import CEConfig, CEObjective, next_token_nll
from ckaqad.objectives.cka import CKAConfig, CKAObjective
from ckaqad.objectives.hidden import HiddenCosineConfig, HiddenCosineObjective, HiddenMSEConfig, HiddenMSEObjective
from ckaqad.objectives.kl import KLConfig, KLObjective, chunked_kl
from ckaqad.parallel.config import ParallelConfig
from ckaqad.parallel.dist import current_world
from ckaqad.parallel.fsdp import local_bytes, optimizer_local_bytes
from ckaqad.parallel.memory import LlamaShape, plan_memory
from ckaqad.students.store import save_student_dir
from ckaqad.train.trainer import local_micro_batch, make_captures, micro_step, sample_rows


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach().double() - b.detach().double()).abs().max())


def cka_checks(rank: int, world: int) -> dict:
    """Distributed CKA (feature form n > d, Gram form n < d, debiased) against linear_cka on the concatenated
    rows; value and the gradient of each rank's rows. Uneven row counts, including a rank with 1 row."""
    out = {}
    for name, (counts, d1, d2, debiased) in {"feature": ([23, 17], 6, 5, False), "gram": ([7, 1], 16, 12, False),
                                             "debiased": ([12, 9], 6, 8, True)}.items():
        g = torch.Generator().manual_seed(7)
        x_all = torch.randn(sum(counts), d1, generator=g, dtype=torch.float64)
        y_all = x_all[:, :min(d1, d2)].repeat(1, 2)[:, :d2] + 0.5 * torch.randn(sum(counts), d2, generator=g,
                                                                                 dtype=torch.float64)
        start = sum(counts[:rank])
        x_mine = x_all[start:start + counts[rank]].clone().requires_grad_(True)
        value = distributed_linear_cka(x_mine, y_all[start:start + counts[rank]], counts, debiased=debiased)
        value.backward()
        full = x_all.clone().requires_grad_(True)
        reference = linear_cka(full, y_all, debiased=debiased)
        reference.backward()
        out[name] = {"value": float(value), "reference": float(reference), "value_diff": abs(float(value - reference)),
                     "grad_diff": max_diff(x_mine.grad, full.grad[start:start + counts[rank]]),
                     "grad_scale": float(full.grad.abs().max())}
    return out


def accumulator_checks(rank: int, world: int) -> dict:
    """The sharded evaluation's CKA: rank r accumulates minibatches r, r+N, ... (rank 1 starts from another
    shift, and one case leaves rank 1 without rows), `all_reduce_accumulator_` merges them; against one
    accumulator fed every minibatch in order."""
    out = {}
    for name, sizes in {"spread": [9, 14, 11, 6, 13], "one batch": [17]}.items():
        g = torch.Generator().manual_seed(5)
        mix = torch.randn(4, 5, generator=g, dtype=torch.float64)
        batches = []
        for n in sizes:
            x = torch.randn(n, 6, generator=g, dtype=torch.float64) * 3 + 40.0  # far from 0: the shift matters
            batches.append((x, x[:, :4] @ mix + 4 * torch.randn(n, 5, generator=g, dtype=torch.float64)))
        one, mine = CKAAccumulator(), CKAAccumulator()
        for i, (x, y) in enumerate(batches):
            one.update(x, y)
            if i % world == rank:
                mine.update(x, y)
        all_reduce_accumulator_(mine)
        out[name] = {"biased": mine.biased(), "want_biased": one.biased(), "debiased": mine.debiased(),
                     "want_debiased": one.debiased(), "n": mine.n, "want_n": one.n, "batches": mine.batches,
                     "want_batches": one.batches}
    return out


def token_term_checks(rank: int, world: int) -> dict:
    """KL and CE over a global batch with padding: each rank's term equals the global mean, and the gradients
    of its logits equal the single-process ones."""
    g = torch.Generator().manual_seed(3)
    batch_rows, seq, vocab = 4, 6, 11
    s_all = torch.randn(batch_rows, seq, vocab, generator=g, dtype=torch.float32)
    t_all = torch.randn(batch_rows, seq, vocab, generator=g, dtype=torch.float32)
    ids = torch.randint(0, vocab, (batch_rows, seq), generator=g)
    mask = torch.ones(batch_rows, seq, dtype=torch.long)
    mask[0, :4] = 0  # rank 0 holds fewer valid tokens than rank 1
    share = batch_rows // world
    rows = slice(rank * share, (rank + 1) * share)
    out = {}
    for name, objective in {"kl": KLObjective(KLConfig()), "ce": CEObjective(CEConfig(ce_weight=1.0))}.items():
        mine = s_all[rows].clone().requires_grad_(True)
        value = objective(ForwardOutputs(mine, t_all[rows], {"input_ids": ids[rows], "attention_mask": mask[rows]}))
        value.backward()
        full = s_all.clone().requires_grad_(True)
        # the one-process term, outside the process group's reach: a plain chunked_kl / CE on every row
        if name == "kl":
            reference = chunked_kl(full, t_all, mask, count=mask.sum().float())
        else:
            nll, count = next_token_nll(full, ids, mask)
            reference = nll / count
        reference.backward()
        out[name] = {"value_diff": abs(float(value - reference)), "value": float(value),
                     "grad_diff": max_diff(mine.grad, full.grad[rows]), "grad_scale": float(full.grad.abs().max())}
    return out


def state_term_checks(rank: int, world: int) -> dict:
    """The hidden-state terms (hidden-cosine, hidden-mse, the debiased CKA term) on uneven row counts: each rank's
    term equals the one-process term of all rows, and its rows' gradients the one-process ones."""
    counts = [23, 17]
    g = torch.Generator().manual_seed(11)
    ys_all = {i: torch.randn(sum(counts), 8, generator=g, dtype=torch.float64) for i in range(3)}
    xs_all = {i: y + 0.4 * torch.randn(y.shape, generator=g, dtype=torch.float64) for i, y in ys_all.items()}
    start = sum(counts[:rank])
    rows = slice(start, start + counts[rank])
    objectives = {"hidden-cosine": HiddenCosineObjective(HiddenCosineConfig()),
                  "hidden-mse": HiddenMSEObjective(HiddenMSEConfig()),
                  "cka-debiased": CKAObjective(CKAConfig(cka_debiased=True))}
    empty = torch.zeros(1, 1, 2)
    out = {}
    for name, objective in objectives.items():
        mine = {i: x[rows].clone().requires_grad_(True) for i, x in xs_all.items()}
        value = objective(ForwardOutputs(empty, empty, {}, mine, {i: y[rows] for i, y in ys_all.items()}, counts))
        value.backward()
        full = {i: x.clone().requires_grad_(True) for i, x in xs_all.items()}
        reference = objective(ForwardOutputs(empty, empty, {}, full, ys_all, None))  # no row counts: one process
        reference.backward()
        out[name] = {"value": float(value), "value_diff": abs(float(value - reference)),
                     "grad_diff": max(max_diff(mine[i].grad, full[i].grad[rows]) for i in mine),
                     "grad_scale": max(float(full[i].grad.abs().max()) for i in full)}
    return out


def memory_checks(root: Path, rank: int) -> dict:
    """The planner's per-rank parameter, gradient and optimizer bytes against the DTensor shards after one
    backward and one optimizer step of the sharded tiny student."""
    trainee, _ = distill.build_trainee(config(root, root / "memory-run"), world=current_world())
    captures = make_captures(trainee)
    batch = next(train_batches(trainee.blocks.train, trainee.config.batch_size, 0))
    local, rows, counts = local_micro_batch(trainee, batch, sample_rows(trainee, batch, 0, 0))
    micro_step(trainee, local, rows, captures, counts).loss.backward()
    held = local_bytes(trainee.student)
    trainee.optimizer.step()
    captures.remove()
    # The sharded student streamed to rank 0's files, several of them (the test re-writes it in one process).
    save_student_dir(trainee.student, root / "streamed" if rank == 0 else None, trainee.tokenizer,
                     shard_size_bytes=SMALL_SHARD_BYTES)
    student_config = trainee.student.config.to_dict()
    shape = LlamaShape.from_config(student_config, "tiny")
    trains_all = trainee.student.model.embed_tokens.weight.requires_grad  # --high-precision train
    plan = plan_memory(shape, dist.get_world_size(), 4, 32, teacher_sharded=False, rank=rank,
                       train_high_precision=trains_all)
    return {"parameters": held["parameters"], "gradients": held["gradients"],
            "optimizer": optimizer_local_bytes(trainee.optimizer), "plan_parameters": plan.student_masters,
            "plan_gradients": plan.gradients, "plan_optimizer": plan.optimizer}


def main(root: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"world": world, "cka": cka_checks(rank, world), "tokens": token_term_checks(rank, world),
              "states": state_term_checks(rank, world), "accumulator": accumulator_checks(rank, world)}
    result["memory"] = memory_checks(root, rank)
    # 4 steps at 2 processes, with the teacher sharded and activation checkpointing: still the 1-process run.
    distill.run(config(root, root / "r2", parallel=ParallelConfig(teacher_sharding="shard",
                                                                  activation_checkpointing=True)))
    if rank == 0:
        cut_at(root / "r2", root / "r2_cut2", 2)
        cut_at(root / "r2", root / "r2_cut1", 2)  # resumed at 1 process by the test
    dist.barrier()
    distill.run(config(root, root / "r2_cut2", resume=root / "r2_cut2",
                       parallel=ParallelConfig(teacher_sharding="replicate", load_method="whole")))
    distill.run(config(root, root / "r1_cut", resume=root / "r1_cut"))
    distill.run(config(root, root / "r2_lean", train=LEAN,
                       parallel=ParallelConfig(cpu_offload=True, load_method="broadcast")))
    (root / f"worker-{rank}.json").write_text(json.dumps(result, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main(Path(sys.argv[1]))
