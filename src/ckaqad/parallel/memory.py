"""How many bytes one rank holds when a Llama-shaped teacher and its student train under FSDP2 (the arithmetic
behind `ckaqad plan`).

Exact for what FSDP2 stores (tests/parallel check it against the DTensor shards): every parameter is split
along dim 0 into N chunks of ceil(D/N) rows (`torch.chunk`; the last ranks may hold fewer or none), so rank 0
holds the most; the student keeps FP32 masters of its shard, and FP32 gradients, two FP32 AdamW moments and
one FP32 `step` scalar per tensor of what trains (the quantized Linear weights; everything with
`--high-precision train`). Estimated (a count of the tensors autograd keeps, not a measurement) for
activations: per token and decoder block, the saved inputs and outputs of the norms, projections, rotary
embedding, attention and SwiGLU, the fake-quantized Linear inputs (W4A4) and, since the straight-through
weight is an input of `F.linear`, each block's fake-quantized weights (in the compute dtype); plus student
and teacher logits and the chunked KL's gradient buffer. Activation checkpointing keeps only each block's
input and one block's working set. Working set: the gathered (unsharded) parameters of two blocks (the one
computing and the one prefetched) and of the root unit (embeddings and head), in the compute dtype.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path

from ckaqad.errors import ConfigError

GIB = 2**30
# Host RSS of one rank before any weight exists: the interpreter, torch, transformers (with the model's module),
# tokenizer, data and the gloo group (benchmarks/rss_vs_plan.py, the RSS when the first shard is filled: 0.46-0.48
# GiB on CPU). A CUDA rank also maps the CUDA libraries and context into its host RSS (not measured: no device).
RUNTIME_HOST_BYTES = int(0.47 * GIB)
# Largest safetensors file the meta build reads at once: DCP's reader maps one file and touches this rank's slice
# of each of its tensors, which counts in RSS until the file closes (benchmarks/meta_load.py). Hub models ship
# files of at most 5 GB (save_pretrained's max_shard_size of their time); a smaller model is one file.
WEIGHT_FILE_BYTES = 5 * 10**9
# The final student directory's files (distill and export --shard-size-mb, 2048): rank 0 holds one at a time.
STUDENT_FILE_BYTES = 2048 * 2**20
# glibc's M_MMAP_THRESHOLD (malloc.h) and the value set on CPU runs: see `return_freed_host_memory`.
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD_BYTES = 128 * 1024
# Headroom kept free of the estimate: CUDA context, allocator fragmentation, NCCL buffers.
HEADROOM = 0.10


@dataclass(frozen=True)
class LlamaShape:
    """The config.json values the memory depends on (Llama, Qwen, SmolLM2, Mistral-style decoders)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tied: bool
    head_dim: int | None = None
    # Mixture of experts (0 experts: a dense SwiGLU MLP). Each expert counts as its own 2-D Linear weights.
    experts: int = 0
    experts_per_token: int = 0
    expert_intermediate: int = 0
    shared_expert_intermediate: int = 0
    expert_matrices: int = 3
    """3: SwiGLU experts (gate, up, down); 2: non-gated ones (Nemotron-H's squared ReLU: up, down)"""
    pattern: str = ""
    """hybrid stacks (Nemotron-H's hybrid_override_pattern), one character per block: M Mamba-2, E MoE,
    * attention, - dense MLP; empty: every block is attention + MLP (or MoE)"""
    mamba_heads: int = 0
    mamba_head_dim: int = 0
    mamba_state: int = 0
    mamba_groups: int = 0
    mamba_conv: int = 4
    qk_norm: bool = False
    """Qwen3's RMSNorm of each head's q and k (two weights of head_dim per attention block)"""

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    @property
    def block_kinds(self) -> str:
        """One character per decoder block: A (attention + MLP or MoE) or the hybrid pattern's kinds."""
        return self.pattern or "A" * self.layers

    def _attention_shapes(self) -> list[tuple[int, ...]]:
        h, d = self.hidden, self.dim_per_head
        return [(self.heads * d, h), (self.kv_heads * d, h), (self.kv_heads * d, h), (h, self.heads * d)] \
            + ([(d,), (d,)] if self.qk_norm else []) + [(h,)]

    def _mlp_shapes(self, intermediate: int, matrices: int = 3) -> list[tuple[int, ...]]:
        h, i = self.hidden, intermediate
        return [(i, h)] * (matrices - 1) + [(h, i)]

    def _moe_shapes(self) -> list[tuple[int, ...]]:
        shared = self._mlp_shapes(self.shared_expert_intermediate, self.expert_matrices) \
            if self.shared_expert_intermediate else []
        return ([(self.experts, self.hidden)]  # the router (kept in high precision: DEFAULT_EXCLUDE)
                + self._mlp_shapes(self.expert_intermediate, self.expert_matrices) * self.experts + shared
                + [(self.hidden,)])

    def _ffn_shapes(self) -> list[tuple[int, ...]]:
        return self._moe_shapes() if self.experts else self._mlp_shapes(self.intermediate) + [(self.hidden,)]

    def _mamba_shapes(self) -> list[tuple[int, ...]]:
        """Mamba-2 (transformers' NemotronHMamba2Mixer): in_proj to z, x, B, C, dt; depthwise conv; out_proj."""
        h, heads, inner = self.hidden, self.mamba_heads, self.mamba_heads * self.mamba_head_dim
        conv = inner + 2 * self.mamba_groups * self.mamba_state
        return [(inner + conv + heads, h), (conv, 1, self.mamba_conv), (conv,), (heads,), (heads,), (heads,),
                (inner,), (h, inner), (h,)]

    def kind_shapes(self, kind: str) -> list[tuple[int, ...]]:
        """Parameter shapes of one block of this kind."""
        if kind == "A":
            return self._attention_shapes()[:-1] + self._ffn_shapes()[:-1] + [(self.hidden,), (self.hidden,)] \
                if not self.experts else self._attention_shapes() + self._ffn_shapes()
        return {"M": self._mamba_shapes, "E": self._moe_shapes, "*": self._attention_shapes,
                "-": lambda: self._mlp_shapes(self.intermediate) + [(self.hidden,)]}[kind]()

    def block_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes of the largest decoder block (bias-free projections, RMSNorm weights)."""
        return max((self.kind_shapes(k) for k in set(self.block_kinds)), key=lambda s: sum(map(math.prod, s)))

    def all_block_shapes(self) -> list[tuple[int, ...]]:
        return [s for kind in self.block_kinds for s in self.kind_shapes(kind)]

    def root_shapes(self) -> list[tuple[int, ...]]:
        """The root unit's parameters: embeddings, final norm, and the head unless it is tied."""
        return [(self.vocab, self.hidden), (self.hidden,)] + ([] if self.tied else [(self.vocab, self.hidden)])

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        return self.root_shapes()[:1] + self.all_block_shapes() + self.root_shapes()[1:]

    def quantized_shapes(self) -> list[tuple[int, ...]]:
        """The 2-D Linear weights of the blocks a student quantizes (routers stay in high precision)."""
        router = (self.experts, self.hidden)
        return [s for s in self.all_block_shapes() if len(s) == 2 and not (self.experts and s == router)]

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.parameter_shapes())

    @property
    def block_parameters(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes())

    @property
    def block_linear_parameters(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes() if len(s) == 2)

    def tokens_elements(self, w4a4: bool) -> int:
        """Activation elements autograd keeps per token, summed over the blocks (an estimate, see the module
        docstring): attention 7h + 3kv (+2h W4A4 inputs), a dense MLP 3h + 5i (+h + i), an MoE block the
        router logits and, per routed expert, its copy of the input and its MLP, a Mamba-2 block its projections
        and scan outputs."""
        h, kv = self.hidden, self.kv_heads * self.dim_per_head
        attention = 7 * h + 3 * kv + (2 * h if w4a4 else 0)

        def mlp(i: int, matrices: int = 3) -> int:
            return (5 * i if matrices == 3 else 3 * i) + (i if w4a4 else 0)

        dense = 3 * h + mlp(self.intermediate) + (h if w4a4 else 0)
        routed = self.experts_per_token * (h + mlp(self.expert_intermediate, self.expert_matrices))
        moe = 3 * h + self.experts + routed \
            + (mlp(self.shared_expert_intermediate, self.expert_matrices) if self.shared_expert_intermediate else 0)
        inner = self.mamba_heads * self.mamba_head_dim
        mamba = 3 * h + 6 * inner + (h + inner if w4a4 else 0)
        ffn = moe if self.experts else dense
        per_kind = {"A": attention + ffn, "M": mamba, "E": moe, "*": attention, "-": dense}
        return sum(per_kind[k] for k in self.block_kinds)

    @classmethod
    def from_config(cls, config: dict, name: str) -> LlamaShape:
        experts = int(config.get("num_experts") or config.get("num_local_experts") or config.get("n_routed_experts")
                      or 0)
        try:
            moe = dict(experts=experts, experts_per_token=int(config.get("num_experts_per_tok")
                                                              or config.get("experts_per_token") or 0),
                       expert_intermediate=int(config.get("moe_intermediate_size") or config["intermediate_size"]),
                       shared_expert_intermediate=int(config.get("moe_shared_expert_intermediate_size") or 0)
                       ) if experts else {}
            return cls(name=name, hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
                       kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                       vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                       head_dim=int(config["head_dim"]) if config.get("head_dim") else None,
                       qk_norm=config.get("model_type") in ("qwen3", "qwen3_moe"), **moe)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: not a Llama-style config ({type(exc).__name__}: {exc}); it needs "
                              "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"
                              ) from exc


# Published config.json values (Hugging Face model cards of each model).
SHAPES = {
    "smollm2-135m": LlamaShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
    "llama-3.1-8b": LlamaShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, tied=False),
    "llama-3.1-70b": LlamaShape("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, tied=False),
    # Qwen/Qwen3-4B(-Thinking-2507) config.json: the paper's 4.0B model.
    "qwen3-4b": LlamaShape("Qwen3-4B", 2560, 9728, 36, 32, 8, 151936, tied=True, head_dim=128, qk_norm=True),
    # Qwen/Qwen3-30B-A3B config.json: 128 SwiGLU experts of 768, 8 per token.
    "qwen3-30b-a3b": LlamaShape("Qwen3-30B-A3B", 2048, 6144, 48, 32, 4, 151936, tied=False, head_dim=128,
                                experts=128, experts_per_token=8, expert_intermediate=768, qk_norm=True),
    # openai/gpt-oss-20b config.json: 32 SwiGLU experts of 2880, 4 per token (biases and attention sinks left out).
    "gpt-oss-20b": LlamaShape("GPT-OSS-20B", 2880, 2880, 24, 64, 8, 201088, tied=False, head_dim=64,
                              experts=32, experts_per_token=4, expert_intermediate=2880),
    # nvidia/NVIDIA-Nemotron-3-Nano-30B-A3B-BF16 config.json (and Megatron-Bridge's Nemotron3NanoProvider): 52 blocks
    # of hybrid_override_pattern, 128 squared-ReLU experts of 1856 + a shared one of 3712, 6 per token, Mamba-2 with
    # 64 heads of 64, state 128, 8 groups: the paper's 31.6B model.
    "nemotron-3-nano-30b-a3b": LlamaShape(
        "Nemotron-3-Nano-30B-A3B", 2688, 1856, 52, 32, 2, 131072, tied=False, head_dim=128, experts=128,
        experts_per_token=6, expert_intermediate=1856, shared_expert_intermediate=3712, expert_matrices=2,
        pattern="MEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEM*EMEMEMEM*EMEMEMEME", mamba_heads=64, mamba_head_dim=64,
        mamba_state=128, mamba_groups=8),
}
SHAPE_ALIASES = {"default": "smollm2-135m"}


def resolve_shape(spec: str) -> LlamaShape:
    """A built-in shape name, `default` (the embedded SmolLM2-135M), a config.json, or an HF model directory."""
    key = SHAPE_ALIASES.get(spec.lower(), spec.lower())
    if key in SHAPES:
        return SHAPES[key]
    path = Path(spec).expanduser()
    config_file = path / "config.json" if path.is_dir() else path
    if not config_file.is_file():
        raise ConfigError(f"--teacher {spec!r} is neither a built-in shape ({', '.join(SHAPES)}, default) nor a "
                          "config.json or model directory")
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read {config_file}: {exc}") from exc
    config = config.get("text_config", config) if isinstance(config, dict) else config
    if not isinstance(config, dict):
        raise ConfigError(f"{config_file} does not hold a JSON object")
    return LlamaShape.from_config(config, path.name if path.is_dir() else path.stem)


def return_freed_host_memory() -> bool:
    """Make glibc serve every allocation of 128 KiB or more (any tensor that matters) with its own mmap, so that
    freeing it returns the memory to the system. By default glibc raises that threshold each time such a block
    is freed, up to 32 MiB, and the tensors below it then come from the heap, which keeps freed memory: a CPU
    run's RSS after its first step stayed at its peak, 1.5x the planner's bytes (docs/distributed.md
    #host-memory-per-rank measures it). Fixing the threshold keeps the RSS at what is live, which the
    planner counts. False where the C library is not glibc (nothing changed)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):
        return False


def shard_elements(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements rank `rank` holds of a parameter FSDP2 shards over `world` ranks (dim-0 chunks of ceil(D/N))."""
    rows = shape[0]
    chunk = -(-rows // world)
    mine = max(0, min(chunk, rows - rank * chunk))
    return mine * math.prod(shape[1:])


# Bytes per element of each AdamW moment for each `--optimizer` (train/optimizers.py allocates these).
OPTIMIZER_MOMENT_BYTES = {"adamw": 4, "adamw-bf16": 2}


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one rank (rank 0, which holds the largest shards). With `offload` the student's master shards,
    gradients and optimizer state live in host memory (`host_state`), not on the GPU."""

    shape: LlamaShape
    gpus: int
    teacher_sharded: bool
    tokens_per_rank: int
    teacher: int
    student_masters: int
    gradients: int
    optimizer: int
    working_set: int
    activations: int
    activations_checkpointed: int
    logits: int
    offload: bool = False
    optimizer_name: str = "adamw"
    build_peak: int = 0
    """device bytes while the models are built: on meta, sharded, then each rank fills its shards of teacher and
    FP32 student (`distill.build_sharded`); the teacher's shard (or replica) and the student's shard, plus the
    rank's slice of the weight file being read"""
    host_build_peak: int = 0
    """host bytes of one rank while loading: the rank's slice of the weight file being read (DCP maps it)"""
    eval_peak: int = 0
    """device bytes during the held-out evaluation: the teacher, the student's masters and moments (gradients
    are freed after each step), and the evaluation's own: sharded, one gathered student block and its
    fake-quantized weights at a time (the sharded evaluation); gathered (`eval_gathers`, before it), the whole
    student and a fake-quantized copy of every quantized weight"""
    host_write_peak: int = 0
    """host bytes rank 0 adds while it writes the final student: one file of STUDENT_FILE_BYTES at most"""
    runtime: int = RUNTIME_HOST_BYTES
    """host bytes of the process before any weight (RUNTIME_HOST_BYTES)"""
    meta_build: bool = True
    """built on meta, each rank reading its shards (False: built whole on every rank, `--load-method whole`)"""

    @property
    def state(self) -> int:
        """The student's training state of this rank: master shards, gradients, optimizer moments."""
        return self.student_masters + self.gradients + self.optimizer

    @property
    def host_state(self) -> int:
        return self.state if self.offload else 0

    def total(self, checkpointing: bool) -> int:
        """Device bytes while training, at the step's peak: the start of the backward pass, when every saved
        activation is alive and no gradient yet (the previous step's were freed); or its end, all gradients and
        the activations freed, whichever is larger (measured on CPU: the sum of both over-counts by 12 %)."""
        acts = self.activations_checkpointed if checkpointing else self.activations
        grads = 0 if self.offload else self.gradients
        masters_moments = 0 if self.offload else self.student_masters + self.optimizer
        return self.teacher + masters_moments + max(acts, grads) + self.working_set + self.logits

    def host_per_rank(self, rank: int = 0) -> int:
        """Host RSS of one rank at its peak on a GPU node: the runtime, and loading, the offloaded state while
        training, or (rank 0) the final student's writing beside the offloaded state."""
        write = self.host_write_peak + self.host_state if rank == 0 else 0
        return self.runtime + max(self.host_build_peak, self.host_state, write)

    def cpu_rank_peak(self, checkpointing: bool, rank: int = 0) -> int:
        """Peak RSS of one rank of a CPU run (device = host: offloaded or not, the state is host memory): the
        runtime plus the largest of building, training, evaluating and (rank 0) writing the final student.
        This is what benchmarks/rss_vs_plan.py measures (VmHWM)."""
        device = dataclasses.replace(self, offload=False)  # the same bytes as a run that does not offload
        moved = self.student_masters + self.optimizer if self.offload else 0  # what the peaks below left out
        write = self.teacher + self.student_masters + self.optimizer + self.host_write_peak if rank == 0 else 0
        return self.runtime + max(self.build_peak + (self.student_masters if self.offload else 0),
                                  device.total(checkpointing), self.eval_peak + moved, write)


def plan_memory(shape: LlamaShape, gpus: int, batch_blocks: int, seq_len: int, teacher_sharded: bool,
                compute_bytes: int = 2, teacher_bytes: int = 2, w4a4: bool = True, rank: int = 0,
                train_high_precision: bool = False, optimizer: str = "adamw", offload: bool = False,
                eval_gathers: bool = False, file_bytes: int | None = None, meta_build: bool = True
                ) -> MemoryPlan:
    """Per-rank bytes for `batch_blocks` blocks of `seq_len` tokens per micro-batch (all ranks together).

    compute_bytes: 2 for bf16 compute on GPU (all-gathered blocks, activations), 4 for fp32 on CPU;
    teacher_bytes: the teacher's stored dtype (bf16 on GPU). `train_high_precision`: embeddings, norms and
    head train too (`--high-precision train`); by default (`frozen`) only the quantized Linear weights have
    gradients and AdamW state, the rest keeps its FP32 copy of the served bf16 values. `optimizer`: a key of
    OPTIMIZER_MOMENT_BYTES; `offload`: FSDP2's CPUOffloadPolicy (`--cpu-offload`). `eval_gathers`: the held-out
    evaluation gathers the whole student (before the sharded evaluation); `file_bytes`: bytes per element of
    the weight files (default: `teacher_bytes`). `meta_build`: the models are built on meta and each rank reads
    its shards, as distill does under torchrun for every safetensors teacher, a mixture of experts stored one
    expert at a time included (parallel.loading); False: built whole on every rank (`--load-method whole`, the
    only way for a .bin checkpoint: distill.builds_on_meta)."""
    if gpus < 1 or batch_blocks < 1 or seq_len < 1:
        raise ConfigError("--gpus, --batch-size and --seq-len must be at least 1")
    if optimizer not in OPTIMIZER_MOMENT_BYTES:
        raise ConfigError(f"unknown optimizer {optimizer!r}; choose from {', '.join(OPTIMIZER_MOMENT_BYTES)}")
    shapes = shape.parameter_shapes()
    trained = shapes if train_high_precision else shape.quantized_shapes()
    sharded = sum(shard_elements(s, gpus, rank) for s in shapes)
    sharded_trained = sum(shard_elements(s, gpus, rank) for s in trained)
    teacher = (sharded if teacher_sharded else shape.parameters) * teacher_bytes
    masters = sharded * 4
    # exp_avg, exp_avg_sq and a float32 step per tensor
    optimizer_bytes = 2 * sharded_trained * OPTIMIZER_MOMENT_BYTES[optimizer] + 4 * len(trained)
    root = sum(math.prod(s) for s in shape.root_shapes())
    # Two gathered student blocks and the root, in the compute dtype, and one block's unsharded fp32 gradient
    # before its reduce-scatter; a sharded teacher gathers its blocks the same way.
    working = (2 * shape.block_parameters + root) * compute_bytes + shape.block_parameters * 4
    if teacher_sharded:
        working += (2 * shape.block_parameters + root) * teacher_bytes
    tokens = -(-batch_blocks // gpus) * seq_len
    # Saved per token (tokens_elements) + each block's fake-quantized weights, saved by F.linear in the compute
    # dtype (an MoE block: every expert that receives a token, all of them at these token counts).
    activations = tokens * shape.tokens_elements(w4a4) * compute_bytes \
        + shape.layers * shape.block_linear_parameters * compute_bytes
    block_acts = tokens * shape.tokens_elements(w4a4) * compute_bytes // max(shape.layers, 1) \
        + shape.block_linear_parameters * compute_bytes
    checkpointed = shape.layers * tokens * shape.hidden * compute_bytes + block_acts
    # Student and teacher logits in the compute dtype and the chunked KL's gradient of the student logits.
    logits = 3 * tokens * shape.vocab * compute_bytes
    quantized = sum(math.prod(s) for s in shape.quantized_shapes())
    # The evaluation: a sharded student is gathered (whole, or one block at a time) in the compute dtype; one
    # process already holds its FP32 masters. The held fake-quantized weights have the gathered weights' dtype
    # (FP32 in one process). A sharded teacher gathers its blocks as in training.
    if eval_gathers or gpus == 1:
        gathered = shape.parameters * compute_bytes if gpus > 1 else 0
        held = quantized * (compute_bytes if gpus > 1 else 4)
    else:
        gathered = (shape.block_parameters + root) * compute_bytes
        held = shape.block_linear_parameters * compute_bytes
    teacher_working = (2 * shape.block_parameters + root) * teacher_bytes if teacher_sharded else 0
    eval_peak = teacher + (0 if offload else masters + optimizer_bytes) + gathered + held + teacher_working \
        + 2 * logits // 3
    # The build: the rank's shards, then the rank's slice of one weight file mapped while it is read.
    reading = min(shape.parameters * (file_bytes or teacher_bytes), WEIGHT_FILE_BYTES) // gpus
    # Built whole: every rank holds the whole teacher and the whole FP32 student before `fully_shard`, after
    # `from_pretrained` read the whole teacher on the host.
    build_peak = teacher + (0 if offload else masters) + reading if meta_build \
        else shape.parameters * (teacher_bytes + 4)
    host_build_peak = reading + (masters if offload else 0) if meta_build \
        else shape.parameters * teacher_bytes
    whole_student = shape.parameters * 4
    return MemoryPlan(shape=shape, gpus=gpus, teacher_sharded=teacher_sharded, tokens_per_rank=tokens,
                      teacher=teacher, student_masters=masters, gradients=sharded_trained * 4,
                      optimizer=optimizer_bytes, working_set=working, activations=activations,
                      activations_checkpointed=checkpointed, logits=logits, offload=offload,
                      optimizer_name=optimizer, build_peak=build_peak, host_build_peak=host_build_peak,
                      eval_peak=eval_peak,
                      host_write_peak=min(whole_student, STUDENT_FILE_BYTES), meta_build=meta_build)


def fits(plan: MemoryPlan, memory_bytes: float, checkpointing: bool) -> bool:
    return plan.total(checkpointing) <= (1 - HEADROOM) * memory_bytes


def why_not(plan: MemoryPlan, memory_bytes: float, checkpointing: bool, host_bytes_per_node: float | None,
            gpus_per_node: int) -> str | None:
    """The first limit the plan breaks, in words (None when it fits): training memory, the build before
    sharding, host memory per node."""
    limit = (1 - HEADROOM) * memory_bytes
    if plan.total(checkpointing) > limit:
        return f"training needs {plan.total(checkpointing) / GIB:.1f} GiB per GPU > {limit / GIB:.1f}"
    if plan.eval_peak > limit:
        return f"the held-out evaluation needs {plan.eval_peak / GIB:.1f} GiB per GPU > {limit / GIB:.1f}"
    if plan.build_peak > limit:
        return (f"building needs {plan.build_peak / GIB:.1f} GiB per GPU > {limit / GIB:.1f}"
                + ("" if plan.meta_build else " (built whole on every rank: --load-method whole)"))
    if host_bytes_per_node is not None:
        host = plan.host_per_rank() * min(gpus_per_node, plan.gpus)
        if host > (1 - HEADROOM) * host_bytes_per_node:
            allowed = (1 - HEADROOM) * host_bytes_per_node
            return (f"host memory needs {host / GIB:.0f} GiB per node > {allowed / GIB:.0f}"
                    f" ({min(gpus_per_node, plan.gpus)} ranks of {plan.host_per_rank() / GIB:.0f} GiB)")
    return None


# Layout choices in the order they cost step time: each later one trades speed for memory.
LEVERS = (
    ("nothing", dict(checkpointing=False, shard=False, optimizer="adamw", offload=False)),
    ("activation checkpointing", dict(checkpointing=True, shard=False, optimizer="adamw", offload=False)),
    ("+ teacher sharded", dict(checkpointing=True, shard=True, optimizer="adamw", offload=False)),
    ("+ bf16 AdamW moments", dict(checkpointing=True, shard=True, optimizer="adamw-bf16", offload=False)),
    ("+ CPU offload", dict(checkpointing=True, shard=True, optimizer="adamw", offload=True)),
    ("+ CPU offload, bf16 moments", dict(checkpointing=True, shard=True, optimizer="adamw-bf16", offload=True)),
)


@dataclass(frozen=True)
class Proposal:
    gpus: int
    lever: str
    settings: dict
    plan: MemoryPlan
    tried: tuple[tuple[int, str, str], ...]
    """(gpus, lever, why it did not fit) of every cheaper layout"""


def propose(shape: LlamaShape, memory_bytes: float, batch_blocks: int, seq_len: int, gpus_per_node: int,
            max_nodes: int, host_bytes_per_node: float | None, w4a4: bool = True,
            train_high_precision: bool = False, meta_build: bool = True) -> Proposal | None:
    """The cheapest layout that fits: fewest GPUs (1, 2, 4, ... up to a node, then whole nodes), and on that
    many the first lever of LEVERS that fits (a GPU costs more than any of them). None when nothing fits."""
    counts = [g for g in (1, 2, 4, 8, 16) if g < gpus_per_node] + [gpus_per_node * n for n in range(1, max_nodes + 1)]
    tried: list[tuple[int, str, str]] = []
    for gpus in counts:
        batch = -(-max(batch_blocks, gpus) // gpus) * gpus
        for lever, settings in LEVERS:
            if gpus == 1 and lever == "+ teacher sharded":
                continue  # one rank: nothing to shard over (torchrun --nproc-per-node 1 still offloads)
            settings = {**settings, "shard": settings["shard"] and gpus > 1}
            plan = plan_memory(shape, gpus, batch, seq_len, teacher_sharded=settings["shard"], w4a4=w4a4,
                               train_high_precision=train_high_precision, optimizer=settings["optimizer"],
                               offload=settings["offload"], meta_build=meta_build)
            reason = why_not(plan, memory_bytes, settings["checkpointing"], host_bytes_per_node, gpus_per_node)
            if reason is None:
                return Proposal(gpus, lever, settings, plan, tuple(tried))
            tried.append((gpus, lever, reason))
    return None


def fewest_gpus(shape: LlamaShape, memory_bytes: float, batch_blocks: int, seq_len: int, checkpointing: bool,
                limit: int = 4096, meta_build: bool = True) -> int | None:
    """The smallest number of GPUs (teacher sharded) on which the run fits (training, evaluation and build), None
    beyond `limit`."""
    gpus = 1
    while gpus <= limit:
        plan = plan_memory(shape, gpus, max(batch_blocks, gpus), seq_len, teacher_sharded=True, meta_build=meta_build)
        if why_not(plan, memory_bytes, checkpointing, None, gpus) is None:
            return gpus
        gpus *= 2
    return None
