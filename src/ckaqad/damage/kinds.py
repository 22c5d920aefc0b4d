"""The damage kinds of `ckaqad damage --kind`, one registered name each, and what each does to the model."""

from __future__ import annotations

from ckaqad.registry import Registry

DAMAGE_KINDS: Registry[str] = Registry("damage kind", flag="--kind")
DAMAGE_KINDS.register("magnitude", "unstructured pruning of the smallest |W| of each Linear layer (--sparsity)")
DAMAGE_KINDS.register("wanda", "unstructured pruning by Wanda's |W|·‖x‖ per output row, from calibration activations")
DAMAGE_KINDS.register("2:4", "semi-structured pruning: 2 of every 4 consecutive input weights kept (--score)")
DAMAGE_KINDS.register("drop-blocks", "depth pruning: --blocks LIST, or the --drop K least important blocks")
DAMAGE_KINDS.register("forget", "cross-entropy fine-tuning on a narrow corpus (--forget-data)")
DAMAGE_KINDS.register("nvfp4", "the teacher's calibrated NVFP4 PTQ student (--format/--scheme)")

# Kinds whose student carries a sparsity mask that recovery must keep.
PRUNING_KINDS = ("magnitude", "wanda", "2:4")
