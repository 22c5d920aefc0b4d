"""The flags of a run laid out across processes (they change where tensors live, never what is computed)."""

from __future__ import annotations

from dataclasses import dataclass

from ckaqad.errors import ConfigError
from ckaqad.registry import unknown_name

TEACHER_SHARDING = ("auto", "shard", "replicate")
# auto replicates a teacher whose weights take at most this share of one rank's memory: a replica costs no
# all-gather per block, and below a quarter it leaves the rest for the student's shards and activations.
REPLICATE_SHARE = 0.25
# How a torchrun job fills its models: on the meta device, sharded, then each rank reads its shards with DCP's
# HuggingFace reader or from rank 0's broadcasts (parallel/loading.py); or `whole`, every rank loading the
# whole teacher and building the whole student before sharding (the only way for a .bin-only model directory).
LOAD_METHODS = ("dcp", "broadcast", "whole")


@dataclass
class ParallelConfig:
    teacher_sharding: str = "auto"
    """torchrun: the teacher is shard (FSDP2 per block), replicate (a copy per rank) or auto (by its size)"""
    activation_checkpointing: bool = False
    """recompute each decoder block in the backward pass (non-reentrant) instead of keeping its activations"""
    dist_timeout: float = 600.0
    """seconds a collective waits for the other ranks before the job stops with an error"""
    cpu_offload: bool = False
    """torchrun: the student's shards, gradients and optimizer state in host memory (FSDP2 CPUOffloadPolicy)"""
    load_method: str = "dcp"
    """torchrun, ptq student: dcp or broadcast (built on meta, each rank reads its shards) or whole (all per rank)"""

    def __post_init__(self) -> None:
        if self.teacher_sharding not in TEACHER_SHARDING:
            raise unknown_name("teacher sharding (--teacher-sharding)", self.teacher_sharding, TEACHER_SHARDING)
        if self.load_method not in LOAD_METHODS:
            raise unknown_name("load method (--load-method)", self.load_method, LOAD_METHODS)
        if self.dist_timeout <= 0:
            raise ConfigError(f"--dist-timeout must be positive, got {self.dist_timeout}")
