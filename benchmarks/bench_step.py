"""Distillation step time, throughput, peak memory and MFU: KL-only QAD vs CKA-QAD in the same process.

Timed: one full optimizer step (teacher forward without grad, fake-quant student forward and backward,
chunked KL, CKA term on sampled rows of every decoder block when enabled, clipping, fused AdamW), median
over repeats after warm-up, random weights (speed does not depend on them). MFU counts 8·N FLOPs per token
(student forward 2N + backward 4N, teacher forward 2N; N = parameters) against the matmul rate measured in
the same process (bf16 8192³ on GPU, fp32 1024³ on CPU).

    python benchmarks/bench_step.py [--json out.json] [--shape NAME]  # GPU: SmolLM2-135M, 1B Llama; CPU: small

Distributed mode (`--distributed`): the same step under FSDP2 (parallel/fsdp.py: student sharded per block,
teacher replicated), the batch being the global batch split over the processes; tokens/s of the whole job,
and per rank the peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, VmHWM, which includes
building the models) and the bytes of its student shards, gradients and AdamW state:

    python benchmarks/bench_step.py --distributed --shape cpu-small               # 1 process
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_step.py --distributed --shape cpu-small
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_header, print_table, time_fn, write_json  # noqa: E402


@dataclass(frozen=True)
class ModelShape:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    batch: int
    seq: int
    cka_tokens: int


SMOLLM2 = ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, 8, 512, 2048)
LLAMA_1B = ModelShape("Llama-3.2-1B shape", 2048, 8192, 16, 32, 8, 128256, 8, 1024, 2048)
CPU_SMALL = ModelShape("SmolLM2 width, 4 layers", 576, 1536, 4, 9, 3, 49152, 2, 128, 128)
SMOLLM2_CPU = ModelShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, 4, 128, 256)  # the CPU demo's step
SHAPES = {"smollm2": SMOLLM2, "llama-1b": LLAMA_1B, "cpu-small": CPU_SMALL, "smollm2-cpu": SMOLLM2_CPU}


def matmul_rate(device: torch.device) -> float:
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / time_fn(lambda: a @ b, device)


def build(shape: ModelShape, device: torch.device, loss: str, scheme: str):
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckaqad.capture import LayerMap
    from ckaqad.objectives.compose import Composite, ObjectiveConfig
    from ckaqad.paths import RunDir
    from ckaqad.quant.apply import calibrate, quantize_model_
    from ckaqad.quant.linear import QuantConfig
    from ckaqad.train.checkpointer import CheckpointConfig
    from ckaqad.train.trainer import TrainConfig, Trainee, make_optimizer

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=max(shape.seq, 2048), tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    teacher = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
    # The PTQ student of students.spec.build_ptq_student, calibrated on the benchmark's own batch (random
    # weights: no data set is involved).
    student = copy.deepcopy(teacher).float()
    quantize_model_(student, QuantConfig(scheme=scheme))
    ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    calibrate(student, [batch])
    student.train().requires_grad_(True)
    train_cfg = TrainConfig(steps=1000, batch_size=shape.batch, cka_tokens=shape.cka_tokens, progress=False)
    optimizer, scheduler = make_optimizer(student, train_cfg)

    class _Tok:
        bos_token_id = None

    trainee = Trainee(config=train_cfg, teacher=teacher, student=student, tokenizer=_Tok(), blocks=None,
                      layer_map=LayerMap.parse("proportional", shape.layers, shape.layers),
                      objective=Composite(ObjectiveConfig(loss=loss)), optimizer=optimizer, scheduler=scheduler,
                      checkpoint=CheckpointConfig(), run=RunDir(Path(".")), evaluate=dict)
    n_params = sum(p.numel() for p in teacher.parameters())
    return trainee, batch, n_params


def measure(shape: ModelShape, device: torch.device, loss: str, scheme: str, repeats: int) -> dict:
    from ckaqad.train.trainer import make_captures, train_step

    trainee, batch, n_params = build(shape, device, loss, scheme)
    captures = make_captures(trainee)

    def endless():
        while True:
            yield batch

    data = endless()
    step = [0]

    def one_step():
        train_step(trainee, step[0], data, captures)
        step[0] += 1

    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_fn(one_step, device, warmup=2, repeats=repeats)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    tokens = shape.batch * shape.seq
    captures.remove()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds, "peak_mb": peak,
            "flops_per_s": 8 * n_params * tokens / seconds, "params": n_params}


def process_peak_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA's allocator peak, or the peak resident set (VmHWM) on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def measure_distributed(shape: ModelShape, device: torch.device, loss: str, scheme: str, repeats: int) -> dict:
    """One step under the process group of this launch (or a plain process): global tokens/s, and this rank's
    peak memory and shard bytes, gathered on every rank."""
    import torch.distributed as dist

    from ckaqad.parallel.dist import current_world
    from ckaqad.parallel.fsdp import local_bytes, optimizer_local_bytes, shard_model
    from ckaqad.train.trainer import make_captures, make_optimizer, train_step

    world = current_world()
    trainee, batch, n_params = build(shape, device, loss, scheme)
    if world.distributed:
        shard_model(trainee.student, device, trainable=True)
        trainee.optimizer, trainee.scheduler = make_optimizer(trainee.student, trainee.config)
        trainee.world = world
    captures = make_captures(trainee)
    global_batch = {k: v.cpu() for k, v in batch.items()}

    def endless():
        while True:
            yield global_batch

    data, step = endless(), [0]

    def one_step():
        train_step(trainee, step[0], data, captures)
        step[0] += 1

    seconds = time_fn(one_step, device, warmup=2, repeats=repeats)
    if world.distributed:  # the slowest rank sets the pace
        t = torch.tensor([seconds], dtype=torch.float64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        seconds = float(t)
    # the state right after a backward and an optimizer step (gradients are dropped by train_step)
    held = local_bytes(trainee.student)["parameters"] + optimizer_local_bytes(trainee.optimizer)
    mine = {"rank": world.rank, "peak_mb": process_peak_mb(device), "state_mb": held / 2**20}
    ranks = [mine]
    if world.distributed:
        ranks = [None] * world.size
        dist.all_gather_object(ranks, mine)
    captures.remove()
    tokens = shape.batch * shape.seq
    return {"processes": world.size, "step_ms": seconds * 1e3, "tokens_per_s": tokens / seconds,
            "tokens_per_s_per_process": tokens / seconds / world.size, "params": n_params, "ranks": ranks}


def main_distributed(args) -> dict:
    import torch.distributed as dist

    from ckaqad.parallel.dist import init_world, shutdown

    wanted = "cuda" if torch.cuda.is_available() else "cpu"
    world, created = init_world(wanted, 600.0)
    device = torch.device(world.device(wanted))
    shapes = tuple(SHAPES[name] for name in args.shape) if args.shape else (CPU_SMALL,)
    if args.quick:
        shapes = (ModelShape("tiny", 64, 128, 2, 4, 2, 512, 2, 32, 32),)
    repeats = 2 if args.quick else args.repeats
    rows, records = [], []
    try:
        for shape in shapes:
            if shape.batch % world.size:
                raise SystemExit(f"batch {shape.batch} of {shape.name} does not split over {world.size} processes")
            for loss in ("kl", "kl+cka"):
                r = measure_distributed(shape, device, loss, args.scheme, repeats)
                peaks = "/".join(f"{x['peak_mb']:.0f}" for x in r["ranks"])
                states = "/".join(f"{x['state_mb']:.1f}" for x in r["ranks"])
                rows.append([shape.name, world.size, f"{shape.batch}x{shape.seq}", loss, r["step_ms"],
                             r["tokens_per_s"], r["tokens_per_s_per_process"], peaks, states])
                records.append({**asdict(shape), "loss": loss, **r})
        header = {**device_header(device), "scheme": args.scheme, "processes": world.size,
                  "peak": "max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"}
        payload = {"header": header, "results": records}
        if world.is_main:
            print_table("QAD step across processes (FSDP2)", header,
                        ["model", "procs", "global batch", "loss", "step ms", "tokens/s", "tokens/s/proc",
                         "peak MB per rank", "state MB per rank"], rows)
            write_json(args.json, payload)
    finally:
        if created:
            dist.barrier()
        shutdown(created)
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None)
    parser.add_argument("--scheme", default="w4a4", choices=["w4a4", "w4a16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="one tiny shape, 2 repeats (CI)")
    parser.add_argument("--shape", action="append", choices=sorted(SHAPES),
                        help="model shape(s) to run (default: smollm2 and llama-1b on GPU, cpu-small on CPU)")
    parser.add_argument("--distributed", action="store_true",
                        help="FSDP2 across the processes of this launch (torchrun), or 1 plain process")
    args = parser.parse_args(argv)
    if args.distributed:
        return main_distributed(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = (SMOLLM2, LLAMA_1B) if device.type == "cuda" and not args.quick else (CPU_SMALL,)
    if args.shape:
        shapes = tuple(SHAPES[name] for name in args.shape)
    if args.quick:
        shapes = (ModelShape("tiny", 64, 128, 2, 4, 2, 512, 2, 32, 32),)
    repeats = 2 if args.quick else args.repeats
    peak_rate = matmul_rate(device)
    header = {**device_header(device), "scheme": args.scheme, "matmul_tflops": round(peak_rate / 1e12, 2)}
    rows, records = [], []
    for shape in shapes:
        results = {loss: measure(shape, device, loss, args.scheme, repeats) for loss in ("kl", "kl+cka")}
        base = results["kl"]
        for loss, r in results.items():
            mfu = r["flops_per_s"] / peak_rate
            rows.append([shape.name, f"{shape.batch}x{shape.seq}", loss, r["step_ms"], r["tokens_per_s"],
                         r["peak_mb"], mfu, r["step_ms"] / base["step_ms"] - 1,
                         (r["peak_mb"] / base["peak_mb"] - 1) if device.type == "cuda" else float("nan")])
            records.append({**asdict(shape), "loss": loss, **r, "mfu": mfu,
                            "step_overhead_vs_kl": r["step_ms"] / base["step_ms"] - 1})
    print_table("QAD step: KL-only vs CKA-QAD", header,
                ["model", "batch", "loss", "step ms", "tokens/s", "peak MB", "MFU", "+time", "+memory"], rows)
    payload = {"header": header, "results": records}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
