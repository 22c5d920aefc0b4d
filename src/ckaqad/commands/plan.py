"""`ckaqad plan`: will a CKA-QAD run fit, per rank, on N GPUs of a given memory, and what to change if not.

Prints, for rank 0 (which holds the largest FSDP2 shards), the bytes of the teacher, the student's FP32
master shards, their gradients, the AdamW moments, the gathered blocks, and the activations with and without
activation checkpointing (`parallel.memory` says what is exact and what is estimated). Nothing is loaded:
the shape comes from a built-in name, a config.json or a model directory. Writes nothing unless --json.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ckaqad.errors import ConfigError
from ckaqad.files import write_json
from ckaqad.parallel.config import LOAD_METHODS, REPLICATE_SHARE, TEACHER_SHARDING
from ckaqad.parallel.memory import (
    GIB,
    HEADROOM,
    OPTIMIZER_MOMENT_BYTES,
    SHAPES,
    MemoryPlan,
    fewest_gpus,
    fits,
    plan_memory,
    propose,
    resolve_shape,
    why_not,
)
from ckaqad.quant.linear import HIGH_PRECISION, SCHEMES, QuantConfig
from ckaqad.registry import unknown_name

HELP = "per-GPU memory of a distributed CKA-QAD run (teacher, student shards, optimizer, activations): fits or not"


@dataclass
class Config:
    teacher: str = "default"
    """teacher shape: smollm2-135m, llama-3.1-8b, llama-3.1-70b, default, a config.json or an HF model directory"""
    gpus: int = 1
    """number of GPUs (processes) the run is sharded over"""
    gpu_memory: float = 80.0
    """memory of one GPU in GiB"""
    batch_size: int = 8
    """blocks per micro-batch, all GPUs together (distill's --batch-size)"""
    seq_len: int = 256
    """tokens per block (distill's --seq-len)"""
    teacher_sharding: str = "auto"
    """shard, replicate or auto (replicate when the teacher takes at most a quarter of one GPU)"""
    scheme: str = "w4a4"
    """w4a4 (fake-quantized Linear inputs are kept for the backward pass) or w4a16"""
    high_precision: str = QuantConfig.high_precision
    """frozen (only quantized Linear weights train, distill's default) or train (embeddings, norms, head too)"""
    json: str | None = None
    """also write the plan to this JSON file"""
    optimizer: str = "adamw"
    """distill's --optimizer: adamw (FP32 moments) or adamw-bf16 (bf16 moments)"""
    cpu_offload: bool = False
    """distill's --cpu-offload: the student's master shards, gradients and optimizer state in host memory"""
    gpus_per_node: int = 8
    """GPUs of one node (the proposal fills a node before it adds nodes)"""
    nodes: int = 1
    """most nodes the proposal may use"""
    host_memory: float = 0.0
    """host memory of one node in GiB (0: not checked)"""
    load_method: str = "dcp"
    """distill's --load-method: dcp or broadcast (built on meta, MoE included) or whole (built whole per rank)"""

    def __post_init__(self) -> None:
        if self.gpus < 1 or self.batch_size < 1 or self.seq_len < 1:
            raise ConfigError("--gpus, --batch-size and --seq-len must be at least 1")
        if self.gpu_memory <= 0:
            raise ConfigError(f"--gpu-memory must be positive, got {self.gpu_memory}")
        if self.batch_size % self.gpus:
            raise ConfigError(f"--batch-size {self.batch_size} does not split over {self.gpus} GPUs")
        if self.teacher_sharding not in TEACHER_SHARDING:
            raise unknown_name("teacher sharding (--teacher-sharding)", self.teacher_sharding, TEACHER_SHARDING)
        if self.scheme not in SCHEMES:
            raise unknown_name("scheme (--scheme)", self.scheme, SCHEMES)
        if self.high_precision not in HIGH_PRECISION:
            raise unknown_name("high-precision policy (--high-precision)", self.high_precision, HIGH_PRECISION)
        if self.optimizer not in OPTIMIZER_MOMENT_BYTES:
            raise unknown_name("optimizer (--optimizer)", self.optimizer, OPTIMIZER_MOMENT_BYTES)
        if self.load_method not in LOAD_METHODS:
            raise unknown_name("load method (--load-method)", self.load_method, LOAD_METHODS)
        if self.gpus_per_node < 1 or self.nodes < 1 or self.host_memory < 0:
            raise ConfigError("--gpus-per-node and --nodes must be at least 1, --host-memory at least 0")


def _gib(value: int) -> str:
    return f"{value / GIB:8.2f}"


def advice(config: Config, plan: MemoryPlan, memory: float) -> list[str]:
    """What to change when a layout does not fit (in the order they cost least)."""
    if fits(plan, memory, checkpointing=False):
        return []
    tips = []
    if fits(plan, memory, checkpointing=True):
        return ["add --activation-checkpointing (fits with it)"]
    if not plan.teacher_sharded and config.gpus > 1:
        sharded = plan_memory(plan.shape, config.gpus, config.batch_size, config.seq_len, teacher_sharded=True,
                              w4a4=config.scheme == "w4a4", train_high_precision=config.high_precision == "train",
                              meta_build=plan.meta_build)
        if fits(sharded, memory, checkpointing=True):
            tips.append("use --teacher-sharding shard with --activation-checkpointing (fits with both)")
    needed = fewest_gpus(plan.shape, memory, config.batch_size, config.seq_len, checkpointing=True,
                         meta_build=plan.meta_build)
    if needed:
        batch = -(-config.batch_size // needed) * needed
        tips.append(f"shard over at least {needed} GPUs of {config.gpu_memory:g} GiB (teacher sharded, activation "
                    f"checkpointing, --batch-size {batch}: a multiple of {needed})")
    else:
        tips.append("no power-of-two number of these GPUs up to 4096 holds the run")
    if plan.tokens_per_rank > plan.shape.hidden:
        tips.append("or lower --batch-size / --seq-len (activations and logits scale with the tokens per rank)")
    return tips


def print_proposal(config: Config, shape, memory: float, host: float | None) -> dict | None:
    """Print and return the cheapest layout that fits on up to --nodes nodes of --gpus-per-node GPUs, and why
    each cheaper one does not."""
    found = propose(shape, memory, config.batch_size, config.seq_len, config.gpus_per_node, config.nodes, host,
                    w4a4=config.scheme == "w4a4", train_high_precision=config.high_precision == "train",
                    meta_build=config.load_method != "whole")
    limits = f"{config.nodes} node(s) of {config.gpus_per_node} x {config.gpu_memory:g} GiB" + \
        (f", {config.host_memory:g} GiB host memory per node" if host else "")
    if found is None:
        tried = propose_failures(config, shape, memory, host)
        print(f"cheapest layout on {limits}: none fits; the largest layout tried: {tried}")
        return None
    for gpus, lever, reason in found.tried[-3:]:
        print(f"  not {gpus} GPU(s) with {lever}: {reason}")
    settings = found.settings
    launch = found.gpus > 1 or settings["offload"]  # FSDP2 (and so offload) needs torchrun, also for one GPU
    flags = [f"torchrun --nproc-per-node {min(found.gpus, config.gpus_per_node)}"] if launch else []
    if found.gpus > config.gpus_per_node:
        flags.append(f"--nnodes {found.gpus // config.gpus_per_node}")
    flags += (["--load-method whole"] if config.load_method == "whole" else []) + \
        (["--activation-checkpointing"] if settings["checkpointing"] else []) + \
        (["--teacher-sharding shard"] if settings["shard"] else []) + \
        ([f"--optimizer {settings['optimizer']}"] if settings["optimizer"] != "adamw" else []) + \
        (["--cpu-offload"] if settings["offload"] else [])
    total = found.plan.total(settings["checkpointing"])
    print(f"cheapest layout on {limits}: {found.gpus} GPU(s), {found.lever} ({total / GIB:.1f} GiB per GPU, "
          f"{found.plan.host_per_rank() / GIB:.0f} GiB host per rank): {' '.join(flags) or 'no flags'}")
    return {"gpus": found.gpus, "lever": found.lever, **settings, "total_bytes": total,
            "host_bytes_per_rank": found.plan.host_per_rank(), "flags": flags,
            "tried": [list(t) for t in found.tried]}


def propose_failures(config: Config, shape, memory: float, host: float | None) -> str:
    """Why the largest layout (every GPU, every lever) does not fit."""
    gpus = config.gpus_per_node * config.nodes
    batch = -(-max(config.batch_size, gpus) // gpus) * gpus
    plan = plan_memory(shape, gpus, batch, config.seq_len, teacher_sharded=gpus > 1, w4a4=config.scheme == "w4a4",
                       train_high_precision=config.high_precision == "train", optimizer="adamw-bf16", offload=True,
                       meta_build=config.load_method != "whole")
    return f"{gpus} GPUs, every lever: {why_not(plan, memory, True, host, config.gpus_per_node)}"


def run(config: Config) -> dict:
    """Print the plan; return it as a dict (also written to --json)."""
    shape = resolve_shape(config.teacher)
    memory = config.gpu_memory * GIB
    teacher_bytes = shape.parameters * 2
    sharded = config.teacher_sharding == "shard" or (
        config.teacher_sharding == "auto" and config.gpus > 1 and teacher_bytes > REPLICATE_SHARE * memory)
    plan = plan_memory(shape, config.gpus, config.batch_size, config.seq_len, sharded, w4a4=config.scheme == "w4a4",
                       train_high_precision=config.high_precision == "train", optimizer=config.optimizer,
                       offload=config.cpu_offload, meta_build=config.load_method != "whole")
    where = ", in host memory" if config.cpu_offload else ""
    moments = "bf16" if config.optimizer == "adamw-bf16" else "FP32"
    rows = [("teacher weights (bf16, " + ("sharded" if sharded else "replicated") + ")", plan.teacher),
            (f"student FP32 master shards{where}", plan.student_masters),
            (f"gradients (FP32 shards{where})", plan.gradients),
            (f"AdamW moments ({moments} shards{where})", plan.optimizer),
            ("gathered blocks (working set)", plan.working_set), ("logits + KL gradient", plan.logits)]
    print(f"# ckaqad plan: {shape.name} ({shape.parameters / 1e9:.3f} B parameters) on {config.gpus} x "
          f"{config.gpu_memory:g} GiB, batch {config.batch_size} x {config.seq_len} tokens "
          f"({plan.tokens_per_rank} tokens per rank), {config.scheme}")
    print(f"{'per rank (rank 0)':44s} {'GiB':>8s}")
    rows += [("activations, no checkpointing", plan.activations),
             ("activations, activation checkpointing", plan.activations_checkpointed)]
    for label, value in rows:
        print(f"{label:44s} {_gib(value)}")
    result = {"shape": asdict(shape), "config": asdict(config), "plan": asdict(plan) | {"shape": shape.name},
              "memory_bytes": memory, "headroom": HEADROOM}
    for checkpointing in (False, True):
        name = "total with activation checkpointing" if checkpointing else "total without checkpointing"
        ok = fits(plan, memory, checkpointing)
        total = plan.total(checkpointing)
        print(f"{name:44s} {_gib(total)}  of {config.gpu_memory:g} GiB: {'fits' if ok else 'does not fit'}")
        result["fits_with_checkpointing" if checkpointing else "fits"] = ok
        result["total_bytes_with_checkpointing" if checkpointing else "total_bytes"] = total
    print(f"{'held-out evaluation peak (GPU)':44s} {_gib(plan.eval_peak)}")
    build = "shards + a weight file slice" if plan.meta_build else "whole model, every rank"
    print(f"{f'build peak: {build} (GPU)':44s} {_gib(plan.build_peak)}")
    print(f"{'host RSS of rank 0 (runtime + offload, write)':44s} {_gib(plan.host_per_rank())}")
    host = config.host_memory * GIB if config.host_memory else None
    result["why_not"] = why_not(plan, memory, True, host, config.gpus_per_node)
    if config.cpu_offload and result["fits_with_checkpointing"] and result["why_not"]:
        print(f"  but: {result['why_not']}")
    tips = advice(config, plan, memory)
    for tip in tips:
        print(f"  -> {tip}")
    result["advice"] = tips
    result["proposal"] = print_proposal(config, shape, memory, host)
    print(f"(fits: total <= {1 - HEADROOM:.0%} of the GPU; built-in shapes: {', '.join(SHAPES)})")
    if config.json:
        write_json(config.json, result)
    return result
