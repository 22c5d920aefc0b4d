"""FSDP2 for distillation: the student sharded per decoder block with FP32 master shards, the frozen teacher
sharded the same way or replicated, and activation checkpointing per block.

Layout (torchtitan's `apply_fsdp`/`apply_ac`): each decoder block is one `fully_shard` unit, the root unit
holds the embeddings, final norm and head (a tied head stays one tensor in one unit). Parameters live as
DTensor shards (1/N of every FP32 master weight, gradient and AdamW moment per rank); a block's full weights
exist only during its forward and backward. On CUDA the student all-gathers in bf16 and reduce-scatters in
fp32 (`MixedPrecisionPolicy`); on CPU everything stays fp32. Gradients are *summed* over ranks, not
averaged: every objective term returns on each rank its share of the global batch's gradient (KL over the
global token count, CKA over the gathered rows), as torchtitan does with its global token normalisation.

QuantLinear needs nothing special: its weight global amax is recomputed from the unsharded weight inside the
block's forward (no cache keyed on tensor versions, which FSDP2's all-gather preserves), and the shared
q/k/v input is found by identity within one forward, also when checkpointing recomputes the block.
"""

from __future__ import annotations

import os

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ckaqad.models.arch import decoder_layers
from ckaqad.parallel.config import REPLICATE_SHARE


def apply_activation_checkpointing(model: nn.Module) -> int:
    """Wrap every decoder block in a non-reentrant checkpoint (recomputed in the backward pass); returns the
    number wrapped. Hooks registered on the wrapper afterwards (hidden-state capture) fire once per forward,
    not again in the recomputation; state-dict keys keep their names."""
    layers = decoder_layers(model)
    for index, block in enumerate(list(layers)):
        layers.register_module(str(index), checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT))
    return len(layers)


def shard_model(model: nn.Module, device: torch.device | str, trainable: bool, cpu_offload: bool = False) -> nn.Module:
    """`fully_shard` each decoder block, then the root, in place. A trainable model (the student) reduces its
    gradients by sum and, on CUDA, computes in bf16 from its fp32 shards. `cpu_offload`: its shards, gradients
    and (so) optimizer state stay in host memory (`CPUOffloadPolicy`, pinned on CUDA); each block's shards are
    copied to the device for its all-gather."""
    device = torch.device(device)
    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) \
        if trainable and device.type == "cuda" else MixedPrecisionPolicy()
    offload = CPUOffloadPolicy(pin_memory=device.type == "cuda") if cpu_offload else OffloadPolicy()
    for block in decoder_layers(model):
        fully_shard(block, mp_policy=policy, offload_policy=offload)
    fully_shard(model, mp_policy=policy, offload_policy=offload)
    if trainable:
        for module in model.modules():
            if isinstance(module, FSDPModule):
                # Sum, with no pre/post division (PREMUL_SUM, which gloo lacks, is not used either).
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)
    return model


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def parameter_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters as a full (unsharded) copy."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def rank_memory_bytes(device: torch.device | str) -> int:
    """Memory one rank may use: its GPU's, or the machine's RAM shared by the ranks of this node."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // max(local_ranks, 1)


def choose_teacher_sharding(mode: str, teacher_bytes: int, memory_bytes: int) -> str:
    """`shard` or `replicate` from the flag; `auto` replicates a teacher of at most REPLICATE_SHARE of a rank's
    memory (no all-gather per block) and shards a larger one."""
    if mode != "auto":
        return mode
    return "replicate" if teacher_bytes <= REPLICATE_SHARE * memory_bytes else "shard"


def local_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes this rank holds of the model's parameters and gradients (a DTensor counts its local shard)."""
    def local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if isinstance(t, DTensor) else t

    params = sum(local(p).numel() * local(p).element_size() for p in model.parameters())
    grads = sum(local(p.grad).numel() * local(p.grad).element_size() for p in model.parameters()
                if p.grad is not None)
    return {"parameters": params, "gradients": grads}


def optimizer_local_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of this rank's optimizer state tensors (local shards of DTensors)."""
    total = 0
    for entries in optimizer.state.values():
        for value in entries.values():
            if torch.is_tensor(value):
                local = value.to_local() if isinstance(value, DTensor) else value
                total += local.numel() * local.element_size()
    return total
