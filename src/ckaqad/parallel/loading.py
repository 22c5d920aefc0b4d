"""Materialising a model built on the meta device (`models.load.load_model_on_meta`) after `fully_shard`: each
rank allocates only its shards (`to_empty`) and reads only its rows of every weight from the model's
safetensors files, so no process ever holds the whole model (docs/distributed.md#meta-device-construction).

Two ways to fill the shards, measured side by side by benchmarks/meta_load.py:
- `dcp` (torchtitan's way): `torch.distributed.checkpoint.load` with its `HuggingFaceStorageReader`; every rank
  plans its own reads and takes its dim-0 slices from the memory-mapped files (`safe_open(...).get_slice`).
- `broadcast` (torchtune's rank-0 way): rank 0 reads one whole tensor at a time and broadcasts it; every rank
  copies its rows out and drops it.
`dcp` is the default (the measurement and the reason are in docs/distributed.md#meta-device-construction).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from ckaqad.errors import ModelError
from ckaqad.models.load import weight_keys


def file_name(name: str) -> str:
    """A parameter's name as the model's files spell it: activation checkpointing's wrapper level removed."""
    return name.replace(_CHECKPOINT_PREFIX, "")


def missing_weights(model: nn.Module, model_dir: Path) -> list[str]:
    """The parameters of `model` that the safetensors files of `model_dir` do not hold (a meta build needs none)."""
    keys = weight_keys(model_dir)
    return [file_name(n) for n, _ in model.named_parameters() if file_name(n) not in keys]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


@torch.no_grad()
def materialize_(model: nn.Module, model_dir: Path, device: torch.device | str, method: str = "dcp",
                 round_to: torch.dtype | None = None) -> nn.Module:
    """Give the meta parameters of `model` (sharded or not) storage on `device` and their values from the
    safetensors files of `model_dir`; buffers keep the values the constructor computed (or a quantizer set).

    `round_to`: round the loaded values through this dtype (a float32 student copies a bf16 teacher: the
    values it would have copied). Collective: every rank calls it with the same model layout."""
    missing = missing_weights(model, model_dir)
    if missing:
        raise ModelError(f"{model_dir}: the safetensors files lack {len(missing)} parameters "
                         f"({', '.join(missing[:3])}); load it with --load-method whole")
    device = torch.device(device)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    model.to_empty(device=device)
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
    params = {file_name(n): p for n, p in model.named_parameters()}
    (_load_dcp if method == "dcp" else _load_broadcast)(params, model_dir)
    if round_to is not None:
        for p in params.values():
            _local(p).copy_(_local(p).to(round_to))
    return model


def _load_dcp(params: dict[str, torch.Tensor], model_dir: Path) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    # DCP resolves every DTensor to this rank's slice of the stored tensor and copies into it (dtype cast
    # included); a replicated (plain) tensor is read whole on every rank.
    with warnings.catch_warnings():  # in a plain process DCP warns that it reads for one process: it should
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({n: p.data if not isinstance(p, DTensor) else p for n, p in params.items()},
                 storage_reader=HuggingFaceStorageReader(str(model_dir)), no_dist=not dist.is_initialized())


def _rows_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor `full` for `param` (a DTensor's local shard, or all of it)."""
    if not isinstance(param, DTensor):
        return full
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]


def _load_broadcast(params: dict[str, torch.Tensor], model_dir: Path) -> None:
    from safetensors import safe_open

    files = weight_keys(model_dir)
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for name, param in params.items():
        local = _local(param)
        full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
        if rank0:
            # one file handle per tensor: the mapping (and its resident pages) ends with the tensor
            with safe_open(str(files[name]), framework="pt") as fh:
                full.copy_(fh.get_tensor(name))
        if dist.is_initialized():
            dist.broadcast(full, src=0)
        local.copy_(_rows_of(param, full))
        del full
