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

import json
import math
from dataclasses import dataclass
from pathlib import Path

from ckaqad.errors import ConfigError

GIB = 2**30
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

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden // self.heads

    def block_shapes(self) -> list[tuple[int, ...]]:
        """Parameter shapes of one decoder block (bias-free projections, two RMSNorm weights)."""
        h, i, d = self.hidden, self.intermediate, self.dim_per_head
        return [(self.heads * d, h), (self.kv_heads * d, h), (self.kv_heads * d, h), (h, self.heads * d),
                (i, h), (i, h), (h, i), (h,), (h,)]

    def root_shapes(self) -> list[tuple[int, ...]]:
        """The root unit's parameters: embeddings, final norm, and the head unless it is tied."""
        return [(self.vocab, self.hidden), (self.hidden,)] + ([] if self.tied else [(self.vocab, self.hidden)])

    def parameter_shapes(self) -> list[tuple[int, ...]]:
        return self.root_shapes()[:1] + self.block_shapes() * self.layers + self.root_shapes()[1:]

    @property
    def parameters(self) -> int:
        return sum(math.prod(s) for s in self.parameter_shapes())

    @property
    def block_parameters(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes())

    @property
    def block_linear_parameters(self) -> int:
        return sum(math.prod(s) for s in self.block_shapes() if len(s) == 2)

    @classmethod
    def from_config(cls, config: dict, name: str) -> LlamaShape:
        try:
            return cls(name=name, hidden=int(config["hidden_size"]), intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=int(config["num_attention_heads"]),
                       kv_heads=int(config.get("num_key_value_heads") or config["num_attention_heads"]),
                       vocab=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
                       head_dim=int(config["head_dim"]) if config.get("head_dim") else None)
        except (KeyError, TypeError, ValueError) as exc:
            raise ConfigError(f"{name}: not a Llama-style config ({type(exc).__name__}: {exc}); it needs "
                              "hidden_size, intermediate_size, num_hidden_layers, num_attention_heads, vocab_size"
                              ) from exc


# Published config.json values (Hugging Face model cards of each model).
SHAPES = {
    "smollm2-135m": LlamaShape("SmolLM2-135M", 576, 1536, 30, 9, 3, 49152, tied=True),
    "llama-3.1-8b": LlamaShape("Llama-3.1-8B", 4096, 14336, 32, 32, 8, 128256, tied=False),
    "llama-3.1-70b": LlamaShape("Llama-3.1-70B", 8192, 28672, 80, 64, 8, 128256, tied=False),
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


def shard_elements(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements rank `rank` holds of a parameter FSDP2 shards over `world` ranks (dim-0 chunks of ceil(D/N))."""
    rows = shape[0]
    chunk = -(-rows // world)
    mine = max(0, min(chunk, rows - rank * chunk))
    return mine * math.prod(shape[1:])


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes of one rank (rank 0, which holds the largest shards)."""

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

    def total(self, checkpointing: bool) -> int:
        acts = self.activations_checkpointed if checkpointing else self.activations
        return (self.teacher + self.student_masters + self.gradients + self.optimizer + self.working_set
                + acts + self.logits)


def plan_memory(shape: LlamaShape, gpus: int, batch_blocks: int, seq_len: int, teacher_sharded: bool,
                compute_bytes: int = 2, teacher_bytes: int = 2, w4a4: bool = True, rank: int = 0,
                train_high_precision: bool = False) -> MemoryPlan:
    """Per-rank bytes for `batch_blocks` blocks of `seq_len` tokens per micro-batch (all ranks together).

    compute_bytes: 2 for bf16 compute on GPU (all-gathered blocks, activations), 4 for fp32 on CPU;
    teacher_bytes: the teacher's stored dtype (bf16 on GPU). `train_high_precision`: embeddings, norms and
    head train too (`--high-precision train`); by default (`frozen`) only the quantized Linear weights have
    gradients and AdamW state, the rest keeps its FP32 copy of the served bf16 values."""
    if gpus < 1 or batch_blocks < 1 or seq_len < 1:
        raise ConfigError("--gpus, --batch-size and --seq-len must be at least 1")
    shapes = shape.parameter_shapes()
    trained = shapes if train_high_precision else [s for s in shape.block_shapes() if len(s) == 2] * shape.layers
    sharded = sum(shard_elements(s, gpus, rank) for s in shapes)
    sharded_trained = sum(shard_elements(s, gpus, rank) for s in trained)
    teacher = (sharded if teacher_sharded else shape.parameters) * teacher_bytes
    masters = sharded * 4
    optimizer = 2 * sharded_trained * 4 + 4 * len(trained)  # exp_avg, exp_avg_sq and a float32 step per tensor
    root = sum(math.prod(s) for s in shape.root_shapes())
    # Two gathered student blocks and the root, in the compute dtype, and one block's unsharded fp32 gradient
    # before its reduce-scatter; a sharded teacher gathers its blocks the same way.
    working = (2 * shape.block_parameters + root) * compute_bytes + shape.block_parameters * 4
    if teacher_sharded:
        working += (2 * shape.block_parameters + root) * teacher_bytes
    tokens = -(-batch_blocks // gpus) * seq_len
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.dim_per_head
    # Saved per token and block (elements): norms in/out (4h), q and rotary q (2h), k, v and rotary k (3kv),
    # attention output and o_proj input (2h), residuals (2h), gate, up, act(gate), act·up (4i), down input (i);
    # W4A4 adds the fake-quantized inputs of q/k/v, o, gate/up (3h) and down (i).
    per_token = 10 * h + 3 * kv + 5 * i + ((3 * h + i) if w4a4 else 0)
    # + the block's fake-quantized weights, saved by F.linear in the compute dtype
    block_acts = tokens * per_token * compute_bytes + shape.block_linear_parameters * compute_bytes
    activations = shape.layers * block_acts
    checkpointed = shape.layers * tokens * h * compute_bytes + block_acts
    # Student and teacher logits in the compute dtype and the chunked KL's gradient of the student logits.
    logits = 3 * tokens * shape.vocab * compute_bytes
    return MemoryPlan(shape=shape, gpus=gpus, teacher_sharded=teacher_sharded, tokens_per_rank=tokens,
                      teacher=teacher, student_masters=masters, gradients=sharded_trained * 4, optimizer=optimizer,
                      working_set=working, activations=activations, activations_checkpointed=checkpointed,
                      logits=logits)


def fits(plan: MemoryPlan, memory_bytes: float, checkpointing: bool) -> bool:
    return plan.total(checkpointing) <= (1 - HEADROOM) * memory_bytes


def fewest_gpus(shape: LlamaShape, memory_bytes: float, batch_blocks: int, seq_len: int, checkpointing: bool,
                limit: int = 4096) -> int | None:
    """The smallest number of GPUs (teacher sharded) on which the run fits, None beyond `limit`."""
    gpus = 1
    while gpus <= limit:
        plan = plan_memory(shape, gpus, max(batch_blocks, gpus), seq_len, teacher_sharded=True)
        if fits(plan, memory_bytes, checkpointing):
            return gpus
        gpus *= 2
    return None
