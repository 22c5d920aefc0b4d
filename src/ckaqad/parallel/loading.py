"""Materialising a model built on the meta device (`models.load.load_model_on_meta`) after `fully_shard`: each
rank allocates only its shards (`to_empty`) and reads only its rows of every weight from the model's
safetensors files, so no process ever holds the whole model (docs/distributed.md#meta-device-construction).

Which stored tensor(s) fill each parameter (`stored_weights`) is what `from_pretrained` would read, found with
transformers' own conversion machinery, so no family's renaming is re-typed here:
- a tensor stored under a name transformers renames on load (nemotron_h `backbone.` -> `model.`, mixtral
  `block_sparse_moe` -> `mlp`, the legacy renames) is found with `rename_source_key`, as from_pretrained does;
- a fused 3-D experts parameter (`experts.gate_up_proj` [E, 2I, H], `down_proj`) of a checkpoint that stores each
  expert's matrices apart (every hub MoE: qwen3_moe, mixtral, deepseek_v3, nemotron_h) is filled expert by expert
  from the keys the model's own `save_pretrained` writes (`models.arch.checkpoint_expert_names`), merged with the
  module's `ExpertsLayout` (gate/up concatenated or interleaved, transposed layouts). FSDP2 shards it on dim 0, so a
  rank reads only the experts of its rows, one expert at a time.

Two ways to fill the shards, measured side by side by benchmarks/meta_load.py:
- `dcp` (torchtitan's way): `torch.distributed.checkpoint.load` with its `HuggingFaceStorageReader`; every rank
  plans its own reads and takes its dim-0 slices from the memory-mapped files (`safe_open(...).get_slice`).
  Per-expert tensors: every rank reads its own experts from the mapped files.
- `broadcast` (torchtune's rank-0 way): rank 0 reads one whole tensor (or one merged expert) at a time and
  broadcasts it; every rank copies its rows out and drops it.
`dcp` is the default (the measurement and the reason are in docs/distributed.md#meta-device-construction).
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX
from torch.distributed.tensor import DTensor

from ckaqad.errors import ModelError
from ckaqad.models.arch import ExpertsLayout, checkpoint_expert_names, experts_layout
from ckaqad.models.load import weight_keys


def file_name(name: str) -> str:
    """A parameter's name as the model's files spell it: activation checkpointing's wrapper level removed."""
    return name.replace(_CHECKPOINT_PREFIX, "")


@dataclass(frozen=True)
class StoredExperts:
    """Where the rows of one fused experts parameter are stored: `keys[e]` = {canonical projection: file key}
    of expert `e` (e.g. {"gate_proj": "...experts.3.gate_proj.weight", "up_proj": "...experts.3.up_proj.weight"}),
    merged into the parameter's stored layout by `layout.merge(param, ...)`."""

    layout: ExpertsLayout
    param: str
    keys: tuple[dict[str, str], ...]


@dataclass
class StoredWeights:
    """What fills each tensor of a model (parameters, and persistent buffers the files hold) from the
    safetensors files of a model directory, by tensor name (`file_name`)."""

    files: dict[str, Path]
    """file key -> the safetensors file holding it"""
    plain: dict[str, str] = field(default_factory=dict)
    """tensor name -> the one file key that holds it (maybe under another name)"""
    experts: dict[str, StoredExperts] = field(default_factory=dict)
    """fused experts parameter -> its per-expert keys"""
    missing: list[str] = field(default_factory=list)
    """parameters nothing in the files provides (a missing per-expert key is named in brackets)"""
    converted: list[str] = field(default_factory=list)
    """parameters transformers builds on load by a conversion other than merging experts (not read on meta)"""
    quantized: str | None = None
    """the checkpoint's quantization method (config.json's quantization_config: gpt-oss's MXFP4 experts, a
    compressed-tensors model), which transformers dequantizes on load: not read on meta"""


def _persistent_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    """Buffers a checkpoint may hold (not in `_non_persistent_buffers_set`: a router's `e_score_correction_bias`,
    not the rotary `inv_freq`), by file name."""
    out = {}
    for module_name, module in model.named_modules():
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                out[file_name(f"{module_name}.{name}" if module_name else name)] = buffer
    return out


def _quant_method(model: nn.Module) -> str | None:
    """The `quant_method` of the model config's quantization_config (a dict or a config object), None without."""
    quantization = getattr(getattr(model, "config", None), "quantization_config", None)
    if quantization is None:
        return None
    method = quantization.get("quant_method") if isinstance(quantization, dict) else \
        getattr(quantization, "quant_method", None)
    return str(method or "unnamed")


def _conversions(model: nn.Module) -> tuple[list, list]:
    """transformers' load-time (renamings, converters) for `model`, as `from_pretrained` collects them."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model) if hasattr(model, "config") else []
    return ([m for m in mapping if isinstance(m, WeightRenaming)],
            [m for m in mapping if isinstance(m, WeightConverter)])


def stored_weights(model: nn.Module, model_dir: Path) -> StoredWeights:
    """Map every parameter of `model` (meta, sharded or not; activation-checkpoint names allowed) and every
    persistent buffer the files hold to its stored key(s) in the safetensors files of `model_dir`: each file key
    renamed as `from_pretrained` renames it (transformers' `rename_source_key` with the model's conversion
    mapping), and each fused experts parameter whose files store experts apart to its per-expert keys."""
    from transformers.core_model_loading import apply_renamings, rename_source_key

    files = weight_keys(model_dir)
    out = StoredWeights(files=files, quantized=_quant_method(model))
    params = {file_name(n): p for n, p in model.named_parameters()}
    buffers = _persistent_buffers(model)
    known = {**buffers, **params}
    renamings, converters = _conversions(model)
    prefix = getattr(model, "base_model_prefix", None)
    converted = set()
    for key in sorted(files):
        target, pattern = rename_source_key(key, renamings, converters, prefix, known)
        if target not in known and key in known:  # from_pretrained's second try: the key as it is
            target, pattern = key, None
        if target in known:
            if pattern is None:
                out.plain.setdefault(target, key)
            else:
                converted.add(target)
    # a per-expert key, renamed only (a checkpoint may spell a prefix the legacy way): the file key
    by_renamed = {apply_renamings(key, renamings): key for key in files}
    for module_name, module in model.named_modules():
        layout = experts_layout(module)
        if layout is None or all(f"{file_name(module_name)}.{p}" in out.plain for p in layout.fused):
            continue  # not experts, or stored fused (gpt_oss; a checkpoint saved fused): read as any tensor
        names = checkpoint_expert_names(model, module_name)
        if names is None:
            continue
        count = module._parameters[layout.input_param].shape[0]
        for param in layout.fused:
            keys, absent = [], []
            for e in range(count):
                found = {}
                for proj in layout.fused[param]:
                    saved = file_name(names[(e, proj)])
                    key = saved if saved in files else by_renamed.get(apply_renamings(saved, renamings))
                    if key is None:
                        absent.append(saved)
                    found[proj] = key
                keys.append(found)
            name = f"{file_name(module_name)}.{param}"
            if absent:
                out.missing.append(f"{name} ({absent[0]}{' and others' if len(absent) > 1 else ''})")
            else:
                out.experts[name] = StoredExperts(layout=layout, param=param, keys=tuple(keys))
            converted.discard(name)
    listed = {m.split(" (")[0] for m in out.missing}
    for name in params:
        if name in out.plain or name in out.experts or name in listed:
            continue
        (out.converted if name in converted else out.missing).append(name)
    return out


def missing_weights(model: nn.Module, model_dir: Path) -> list[str]:
    """The parameters of `model` that the safetensors files of `model_dir` do not provide, by any name
    `from_pretrained` reads or per expert (a meta build needs none)."""
    return stored_weights(model, model_dir).missing


def meta_unreadable(model: nn.Module, model_dir: Path) -> str | None:
    """Why the weights of `model_dir` cannot fill a meta-built `model` (then every rank loads it whole), or None:
    no safetensors files (a .bin checkpoint: pickle, never read here), quantized weights (dequantized on load),
    or tensors transformers converts on load other than by merging experts. A missing tensor is not a reason:
    `materialize_` refuses it by name."""
    return _unreadable(stored_weights(model, model_dir))


def _unreadable(stored: StoredWeights) -> str | None:
    if not stored.files:
        return "it has no safetensors weight files"
    if stored.quantized:
        return f"its weights are quantized ({stored.quantized}), which transformers dequantizes on load"
    if stored.converted:
        return (f"transformers converts {len(stored.converted)} of its tensors on load "
                f"({', '.join(stored.converted[:3])})")
    return None


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def _local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, global offset) of this rank's slice of `param` (all of it when it is not a DTensor)."""
    if not isinstance(param, DTensor):
        return tuple(param.shape), (0,) * param.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


@torch.no_grad()
def materialize_(model: nn.Module, model_dir: Path, device: torch.device | str, method: str = "dcp",
                 round_to: torch.dtype | Mapping[str, torch.dtype] | None = None) -> nn.Module:
    """Give the meta parameters of `model` (sharded or not) storage on `device` and their values from the
    safetensors files of `model_dir` (`stored_weights`: renamed keys, per-expert tensors merged); persistent
    buffers the files hold (a router's score correction bias) are read too, other buffers keep the values the
    constructor computed (or a quantizer set).

    `round_to`: round the loaded values through this dtype (a float32 student copies a bf16 teacher: the
    values it would have copied): one dtype for every parameter, or {tensor name: dtype} for each tensor,
    buffers included (the teacher's own dtypes, some kept in float32). Collective: every rank calls it with the
    same model layout."""
    stored = stored_weights(model, model_dir)
    reason = _unreadable(stored)
    if reason:
        raise ModelError(f"{model_dir}: cannot be read into a model built on meta: {reason}; "
                         "load it with --load-method whole")
    if stored.missing:
        raise ModelError(f"{model_dir}: the safetensors files lack {len(stored.missing)} parameters "
                         f"({', '.join(stored.missing[:3])})")
    device = torch.device(device)
    buffers = {name: b.detach().clone() for name, b in model.named_buffers() if not b.is_meta}
    tied = _tied(model)
    model.to_empty(device=device)
    for alias, first in tied:  # to_empty gives each name its own tensor outside FSDP2: tie them again
        module, _, attr = alias.rpartition(".")
        model.get_submodule(module)._parameters[attr] = model.get_parameter(first)
    for name, buffer in model.named_buffers():
        if name in buffers:
            buffer.copy_(buffers[name])
    params = {file_name(n): p for n, p in model.named_parameters()}
    targets = {**{n: b for n, b in _persistent_buffers(model).items() if n in stored.plain}, **params}
    plain = {stored.plain[n]: t for n, t in targets.items() if n in stored.plain}
    experts = {n: targets[n] for n in stored.experts}
    if method == "dcp":
        _load_dcp(plain, model_dir)
        for name, param in experts.items():  # every rank reads its own experts
            fill_expert_rows_(_local(param), stored.experts[name], stored.files, _local_box(param)[1])
    else:
        _load_broadcast(plain, stored.files)
        for name, param in experts.items():
            _broadcast_experts(param, stored.experts[name], stored.files)
    if round_to is not None:
        for name, t in targets.items():
            dtype = round_to.get(name) if isinstance(round_to, Mapping) else round_to if name in params else None
            if dtype is not None and dtype != t.dtype:
                _local(t).copy_(_local(t).to(dtype))
    return model


def _tied(model: nn.Module) -> list[tuple[str, str]]:
    """(alias, first name) of every parameter registered under two names (a head tied to the embedding)."""
    first: dict[int, str] = {}
    tied = []
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in first:
            tied.append((name, first[id(param)]))
        else:
            first[id(param)] = name
    return tied


def read_expert(source: StoredExperts, expert: int, handles: Mapping[Path, object],
                files: dict[str, Path]) -> torch.Tensor:
    """Expert `expert`'s rows of the fused parameter, in its stored layout and the file's dtype: its per-expert
    tensors read from the memory-mapped files (`handles`: open `safe_open` handles by file) and merged
    (`ExpertsLayout.merge`)."""
    parts = {proj: handles[files[key]].get_tensor(key).unsqueeze(0) for proj, key in source.keys[expert].items()}
    return source.layout.merge(source.param, parts)[0]


@contextmanager
def _opened(source: StoredExperts, experts: range, files: dict[str, Path]) -> Iterator[dict[Path, object]]:
    """`safe_open` handles of the files holding `experts` of `source`, open while one fused parameter is read:
    one header parse per file and parameter, and the mapped pages (the rank's rows of that parameter) end
    with it."""
    from safetensors import safe_open

    with ExitStack() as stack:
        paths = sorted({files[k] for e in experts for k in source.keys[e].values()})
        yield {path: stack.enter_context(safe_open(str(path), framework="pt")) for path in paths}


def fill_expert_rows_(out: torch.Tensor, source: StoredExperts, files: dict[str, Path],
                      offset: tuple[int, ...]) -> torch.Tensor:
    """Copy into `out` (a slice [n, ...] of the fused parameter starting at `offset`: expert rows offset[0] ..
    offset[0] + n, a dim-0 shard) the stored values of those experts, one expert at a time (peak extra
    allocation: one expert's tensors), cast to `out`'s dtype."""
    inner = tuple(slice(o, o + s) for o, s in zip(offset[1:], out.shape[1:], strict=True))
    experts = range(offset[0], offset[0] + out.shape[0])
    with _opened(source, experts, files) as handles:
        for row, expert in enumerate(experts):
            out[row].copy_(read_expert(source, expert, handles, files)[inner])
    return out


def _load_dcp(tensors: dict[str, torch.Tensor], model_dir: Path) -> None:
    """Fill `tensors` ({file key: parameter or buffer}) with DCP's HuggingFace reader."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageReader

    # DCP resolves every DTensor to this rank's slice of the stored tensor and copies into it (dtype cast
    # included); a replicated (plain) tensor is read whole on every rank.
    with warnings.catch_warnings():  # in a plain process DCP warns that it reads for one process: it should
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({n: p.data if not isinstance(p, DTensor) else p for n, p in tensors.items()},
                 storage_reader=HuggingFaceStorageReader(str(model_dir)), no_dist=not dist.is_initialized())


def _rows_of(param: torch.Tensor, full: torch.Tensor) -> torch.Tensor:
    """This rank's slice of the full tensor `full` for `param` (a DTensor's local shard, or all of it)."""
    shape, offset = _local_box(param)
    return full[tuple(slice(o, o + s) for o, s in zip(offset, shape, strict=True))]


def _load_broadcast(tensors: dict[str, torch.Tensor], files: dict[str, Path]) -> None:
    """Fill `tensors` ({file key: parameter or buffer}): rank 0 reads one tensor at a time and broadcasts it."""
    from safetensors import safe_open

    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    for key, param in tensors.items():
        local = _local(param)
        full = torch.empty(param.shape, dtype=local.dtype, device=local.device)
        if rank0:
            # one file handle per tensor: the mapping (and its resident pages) ends with the tensor
            with safe_open(str(files[key]), framework="pt") as fh:
                full.copy_(fh.get_tensor(key))
        if dist.is_initialized():
            dist.broadcast(full, src=0)
        local.copy_(_rows_of(param, full))
        del full


def _broadcast_experts(param: torch.Tensor, source: StoredExperts, files: dict[str, Path]) -> None:
    """`_load_broadcast` for a fused experts parameter: rank 0 reads and merges one expert at a time and
    broadcasts it; the rank whose rows hold that expert copies it."""
    local = _local(param)
    shape, offset = _local_box(param)
    inner = tuple(slice(o, o + s) for o, s in zip(offset[1:], shape[1:], strict=True))
    rank0 = not dist.is_initialized() or dist.get_rank() == 0
    with _opened(source, range(param.shape[0]) if rank0 else range(0), files) as handles:
        for expert in range(param.shape[0]):
            row = torch.empty(param.shape[1:], dtype=local.dtype, device=local.device)
            if rank0:
                row.copy_(read_expert(source, expert, handles, files))
            if dist.is_initialized():
                dist.broadcast(row, src=0)
            if offset[0] <= expert < offset[0] + shape[0]:
                local[expert - offset[0]].copy_(row[inner])
            del row
