"""Distillation step time, throughput, peak memory and MFU: KL-only QAD vs CKA-QAD in the same process.

Timed: one full optimizer step (teacher forward without grad, fake-quant student forward and backward,
chunked KL, CKA term on sampled rows of every decoder block when enabled, clipping, fused AdamW), median
over repeats after warm-up, random weights (speed does not depend on them). MFU counts 8·N FLOPs per token
(student forward 2N + backward 4N, teacher forward 2N; N = parameters) against the matmul rate measured in
the same process (bf16 8192³ on GPU, fp32 1024³ on CPU).

    python benchmarks/bench_step.py [--json out.json] [--shape NAME]  # GPU: SmolLM2-135M, 1B Llama; CPU: small

Ratio mode (`--ratios`, issue 23): the plain step (no fake quant), the fp32 W4A4 step and the bf16 W4A4 step
(`--compute-dtype bfloat16`, runtime arithmetic), KL and KL+CKA, and the student's forward+backward alone, all
built in one process (one teacher, one student per arithmetic) and timed in alternating rounds, printed with
their ratios to the plain step of the same dtype; before them, the fake quants of one SmolLM2 layer (1536x576
weight, 512 tokens) against that layer's GEMM. It runs on older trees too (bf16 rows: n/a):

    python benchmarks/bench_step.py --ratios [--repeats 5] [--shape cpu-ratio] [--json out.json]

Distributed mode (`--distributed`): the same step under FSDP2 (parallel/fsdp.py: student sharded per block,
teacher replicated), the batch being the global batch split over the processes; tokens/s of the whole job,
and per rank the peak memory (CUDA: max_memory_allocated; CPU: the process's peak RSS, VmHWM, which includes
building the models) and the bytes of its student shards, gradients and AdamW state:

    python benchmarks/bench_step.py --distributed --shape cpu-small               # 1 process
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_step.py --distributed --shape cpu-small
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_header, print_table, time_fn, time_interleaved, write_json  # noqa: E402


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


def build(shape: ModelShape, device: torch.device, loss: str, scheme: str, quantized: bool = True,
          arithmetic: str = "reference", compute_dtype: str | None = None, models: dict | None = None):
    """A Trainee for one step variant. `models` (the ratio table) keeps one teacher and one student per
    (quantized, arithmetic) across variants, so that a dozen variants fit in memory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from ckaqad.capture import LayerMap
    from ckaqad.objectives.compose import Composite, ObjectiveConfig
    from ckaqad.paths import RunDir
    from ckaqad.quant.apply import calibrate, quantize_model_
    from ckaqad.quant.linear import QuantConfig
    from ckaqad.train.checkpointer import CheckpointConfig
    from ckaqad.train.trainer import TrainConfig, Trainee, make_optimizer

    models = {} if models is None else models
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=shape.hidden, intermediate_size=shape.intermediate,
                         num_hidden_layers=shape.layers, num_attention_heads=shape.heads,
                         num_key_value_heads=shape.kv_heads, vocab_size=shape.vocab,
                         max_position_embeddings=max(shape.seq, 2048), tie_word_embeddings=True)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "teacher" not in models:
        models["teacher"] = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval().requires_grad_(False)
        ids = torch.randint(0, shape.vocab, (shape.batch, shape.seq), device=device)
        models["batch"] = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    teacher, batch = models["teacher"], models["batch"]
    if (quantized, arithmetic) not in models:
        # The PTQ student of students.spec.build_ptq_student, calibrated on the benchmark's own batch (random
        # weights: no data set is involved).
        student = copy.deepcopy(teacher).float()
        if quantized:  # else the plain student: the same loop with no fake quant
            quantize_model_(student, QuantConfig(scheme=scheme, arithmetic=arithmetic))
            calibrate(student, [batch])
        models[quantized, arithmetic] = student.train().requires_grad_(True)
    student = models[quantized, arithmetic]
    dtype_field = {} if compute_dtype is None else {"compute_dtype": compute_dtype}
    train_cfg = TrainConfig(steps=1000, batch_size=shape.batch, cka_tokens=shape.cka_tokens, progress=False,
                            **dtype_field)
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


# ---------------------------------------------------------------------------------- plain vs quantized

# One layer of SmolLM2 (up_proj: 576 -> 1536) on 512 tokens: the yardstick for the fake quant's cost.
LAYER_IN, LAYER_OUT, LAYER_TOKENS = 576, 1536, 512
# The ratio table's default CPU model: SmolLM2 width with 8 blocks, so the decoder blocks carry as many FLOPs as
# the 49152-row head (in the 30-block model they carry 4x), at a step that takes seconds on 2 cores and
# three students (plain, reference W4A4, runtime W4A4) with AdamW state in about 4 GB.
CPU_RATIO = ModelShape("SmolLM2 width, 8 layers", 576, 1536, 8, 9, 3, 49152, 2, 128, 128)
SHAPES["cpu-ratio"] = CPU_RATIO


def cpu_bf16_units() -> str:
    """The CPU's bf16 matrix instructions from /proc/cpuinfo: amx_bf16, avx512_bf16, or none."""
    try:
        flags = next((line.split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError:
        flags = []
    return "+".join(f for f in ("amx_bf16", "avx512_bf16") if f in flags) or "none"


def bf16_step_supported() -> bool:
    """The trainer has a compute dtype (bf16 autocast on CPU); older trees report the bf16 rows as n/a."""
    from ckaqad.train.trainer import TrainConfig

    return "compute_dtype" in TrainConfig.__dataclass_fields__


def layer_candidates(device: torch.device) -> dict[str, Callable[[], object]]:
    """The fake quants of one layer (weight 1536x576, activation 512x576) as the forward calls them, and
    the layer's GEMM in fp32 and bf16."""
    from ckaqad.formats import int4, mxfp4, nvfp4
    from ckaqad.quant.linear import SERVED_FUNCTIONS

    torch.manual_seed(0)
    w = torch.randn(LAYER_OUT, LAYER_IN, device=device) * 0.02
    x = torch.randn(LAYER_TOKENS, LAYER_IN, device=device)
    x_amax = x.abs().amax()
    wb, xb = w.bfloat16(), x.bfloat16()
    runtime_input, runtime_weight = SERVED_FUNCTIONS["runtime"]
    return {
        "GEMM fp32 (512x576 @ 576x1536)": lambda: torch.nn.functional.linear(x, w),
        "GEMM bf16": lambda: torch.nn.functional.linear(xb, wb),
        "nvfp4 weight (reference)": lambda: nvfp4.fake_quantize_reference(w),
        "nvfp4 weight (dispatched)": lambda: nvfp4.fake_quantize(w),
        "nvfp4 input (dispatched)": lambda: nvfp4.fake_quantize(x, x_amax),
        "mxfp4 weight (dispatched)": lambda: mxfp4.fake_quantize(w),
        "int4 weight^T (dispatched)": lambda: int4.fake_quantize(w.T.contiguous()),
        "runtime weight fp32": lambda: runtime_weight(w, w.abs().amax()),
        "runtime input bf16": lambda: runtime_input(xb, x_amax),
    }


def measure_layer(device: torch.device, rounds: int, clock: Callable[[], float] | None = None) -> list[dict]:
    with torch.no_grad():
        times = time_interleaved(layer_candidates(device), device, warmup=3 if rounds > 2 else 1, rounds=rounds,
                                 clock=clock)
    gemm = times["GEMM fp32 (512x576 @ 576x1536)"]
    return [{"what": name, "ms": t * 1e3, "vs_fp32_gemm": t / gemm} for name, t in times.items()]


def fused_cpu_path_present() -> bool:
    """This tree has the compiled CPU fake quant (formats/cpu_fused.py), switchable per call."""
    from ckaqad.formats import backends

    return hasattr(backends, "cpu_fused_mode")


@contextlib.contextmanager
def reference_fake_quant():
    """The references instead of the fused CPU path, for the duration (CKAQAD_CPU_FUSED is read per call)."""
    old = os.environ.get("CKAQAD_CPU_FUSED")
    os.environ["CKAQAD_CPU_FUSED"] = "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ["CKAQAD_CPU_FUSED"]
        else:
            os.environ["CKAQAD_CPU_FUSED"] = old


def step_candidates(shape: ModelShape, device: torch.device, with_bf16: bool = True) -> dict[str, tuple]:
    """name -> (build keyword arguments, loss): the plain and the W4A4 step in fp32 and (where the trainer has
    it) bf16, KL-QAD and CKA-QAD."""
    fp32 = {"compute_dtype": "float32"} if bf16_step_supported() else {}  # (older trees: fp32 is the CPU default)
    rows = {"plain fp32 kl": (dict(quantized=False, **fp32), "kl"),
            "w4a4 fp32 kl": (dict(fp32), "kl"),
            "w4a4 fp32 kl+cka": (dict(fp32), "kl+cka")}
    if fused_cpu_path_present():
        rows["w4a4 fp32 kl, reference fq"] = (dict(fp32), "kl")
    if bf16_step_supported() and with_bf16:
        rows |= {"plain bf16 kl": (dict(quantized=False, compute_dtype="bfloat16"), "kl"),
                 "w4a4 bf16 kl": (dict(arithmetic="runtime", compute_dtype="bfloat16"), "kl"),
                 "w4a4 bf16 kl+cka": (dict(arithmetic="runtime", compute_dtype="bfloat16"), "kl+cka")}
    return rows


def measure_steps(shape: ModelShape, device: torch.device, rounds: int, with_bf16: bool = True,
                  clock: Callable[[], float] | None = None, rows_matching: str | None = None
                  ) -> dict[str, float]:
    """Median seconds of a full `train_step` and of the student's forward+backward alone, every variant built
    in this process and timed in alternating rounds."""
    from ckaqad.train.trainer import autocast, make_captures, train_step

    fns: dict[str, Callable[[], object]] = {}
    models: dict = {}
    for name, (kwargs, loss) in step_candidates(shape, device, with_bf16).items():
        if rows_matching and not re.search(rows_matching, name):
            continue
        trainee, batch, _ = build(shape, device, loss, "w4a4", **kwargs, models=models)
        captures = make_captures(trainee)
        step = [0]

        mode = reference_fake_quant if name.endswith("reference fq") else contextlib.nullcontext

        def one_step(trainee=trainee, batch=batch, captures=captures, step=step, mode=mode):
            with mode():
                train_step(trainee, step[0], iter([batch]), captures)
            step[0] += 1

        fns[f"step {name}"] = one_step
        if loss == "kl" and not name.endswith("reference fq"):
            def fwd_bwd(trainee=trainee, batch=batch):
                dtype = {"compute_dtype": trainee.config.compute_dtype} if bf16_step_supported() else {}
                with autocast(trainee.device, **dtype):
                    logits = trainee.student(**batch).logits
                logits.float().square().mean().backward()
                trainee.student.zero_grad(set_to_none=True)

            fns[f"fwd+bwd {name.removesuffix(' kl')}"] = fwd_bwd
    return time_interleaved(fns, device, warmup=1, rounds=rounds, clock=clock)


def main_ratios(args) -> dict:
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shape = SHAPES[args.shape[0]] if args.shape else (SMOLLM2 if device.type == "cuda" else CPU_RATIO)
    if args.quick:
        shape = ModelShape("tiny", 64, 128, 2, 4, 2, 512, 2, 32, 32)
    rounds = 2 if args.quick else args.repeats
    # Thread CPU time measures the work of a one-thread run alone on a machine shared with other jobs, where
    # wall-clock medians of a few multi-second rounds move with the others' load.
    if args.clock == "thread" and (device.type != "cpu" or torch.get_num_threads() != 1):
        raise SystemExit("--clock thread needs the CPU and one thread (OMP_NUM_THREADS=1)")
    clock = time.thread_time if args.clock == "thread" else time.perf_counter
    header = {**device_header(device), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
              "bf16_units": cpu_bf16_units(), "clock": args.clock,
              "model": shape.name, "batch": f"{shape.batch}x{shape.seq}"}
    layer = measure_layer(device, rounds if args.quick else 4 * rounds, clock)
    print_table("Fake quant of one layer against its GEMM (1536x576 weight, 512 tokens)", header,
                ["what", "ms", "x fp32 GEMM"], [[r["what"], r["ms"], r["vs_fp32_gemm"]] for r in layer])
    times = measure_steps(shape, device, rounds, with_bf16=not args.no_bf16, clock=clock,
                          rows_matching=args.step_rows)
    rows, steps = [], []
    for name, seconds in times.items():
        kind, _, variant = name.partition(" ")
        dtype = "bf16" if "bf16" in variant else "fp32"
        plain = times.get(f"{kind} plain {dtype}" + (" kl" if kind == "step" else ""))
        kl = times.get(name.replace("kl+cka", "kl")) if "kl+cka" in name else None
        if name.endswith("reference fq"):  # the same step with the references: against the fused one
            kl = times.get(name.removesuffix(", reference fq"))
        record = {"what": name, "ms": seconds * 1e3, "vs_plain_same_dtype": seconds / plain if plain else None,
                  "vs_kl": seconds / kl if kl else None}
        steps.append(record)
        rows.append([name, record["ms"], record["vs_plain_same_dtype"] or float("nan"),
                     record["vs_kl"] or float("nan")])
    if not bf16_step_supported():
        rows.append(["bf16 rows", "n/a: no --compute-dtype in this tree", "", ""])
    print_table("Plain vs quantized step, side by side", header,
                ["what", "ms", "x plain (same dtype)", "x KL-QAD (ref fq: x fused)"], rows)
    payload = {"header": header, "layer": layer, "steps": steps}
    write_json(args.json, payload)
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
    parser.add_argument("--no-bf16", action="store_true", help="--ratios without the bf16 rows (less memory)")
    parser.add_argument("--step-rows", default=None, metavar="REGEX",
                        help="--ratios: only the step variants whose name matches (fewer students in memory)")
    parser.add_argument("--clock", default="wall", choices=["wall", "thread"],
                        help="--ratios on CPU: wall time, or the CPU time of the one thread (a shared machine)")
    parser.add_argument("--ratios", action="store_true",
                        help="plain vs fp32/bf16 W4A4 step and fake quant vs GEMM, side by side (the fast-step table)")
    args = parser.parse_args(argv)
    if args.distributed:
        return main_distributed(args)
    if args.ratios:
        return main_ratios(args)
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
