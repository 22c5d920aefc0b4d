"""What ckaqad needs to know about a model family's structure: its decoder blocks, its depth, its tied
output head. One adapter per family; Llama-like models (`model.layers`), GPT-2 (`transformer.h`) and
encoder-decoder style `decoder.layers` are covered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ckaqad.errors import ModelError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of an HF causal LM (`model.model.layers` for Llama-like models)."""
    base = getattr(model, "model", model)
    for name in ("layers", "h", "blocks"):
        layers = getattr(base, name, None)
        if isinstance(layers, nn.ModuleList):
            return layers
    decoder = getattr(base, "decoder", None)
    if decoder is not None and isinstance(getattr(decoder, "layers", None), nn.ModuleList):
        return decoder.layers
    raise ModelError(f"cannot find the decoder blocks of {type(model).__name__}")


def num_layers(model: nn.Module) -> int:
    return len(decoder_layers(model))


def max_sequence_length(model: nn.Module) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def tied_output_name(model: nn.Module) -> str | None:
    """State-dict key of the output embedding when it is tied to the input embedding (one tensor, two names),
    else None."""
    config = getattr(model, "config", None)
    if not getattr(config, "tie_word_embeddings", False):
        return None
    get_out = getattr(model, "get_output_embeddings", None)
    get_in = getattr(model, "get_input_embeddings", None)
    out_emb, in_emb = (get_out() if get_out else None), (get_in() if get_in else None)
    if out_emb is None or in_emb is None:
        return None
    name = next(n for n, mod in model.named_modules() if mod is out_emb)
    return f"{name}.weight"


# --- Mixture-of-Experts and hybrid families -------------------------------------------------------------------
# transformers 5 stores a MoE layer's routed experts as fused 3-D parameters of one `*Experts` module, and marks
# that module with `use_experts_implementation(...)` flags: `has_gate` (gate_up_proj, else up_proj), `is_transposed`
# ([E, in, out] instead of nn.Linear's [E, out, in]), `is_concatenated` (gate rows then up rows; False: gate and up
# interleaved row by row, gpt_oss) and `has_bias` (`<param>_bias` [E, out]). `ExpertsLayout` reads them once, so
# that nothing else needs to know a family's layout.

@dataclass(frozen=True)
class ExpertsLayout:
    """Where an Experts module keeps its per-expert projections.

    `fused`: fused parameter name -> the canonical nn.Linear projection names it holds, in row order of the
    canonical [E, out, in] orientation (`gate_up_proj` -> (gate_proj, up_proj); `up_proj` -> (up_proj,);
    `down_proj` -> (down_proj,)). The first fused parameter reads the block's hidden states; the last reads the
    (gated) activation. `transposed`: stored [E, in, out]. `interleaved`: gate and up rows alternate (gpt_oss)
    instead of gate rows then up rows. `biases`: fused parameter -> its bias parameter ([E, out]).
    """

    fused: dict[str, tuple[str, ...]]
    transposed: bool = False
    interleaved: bool = False
    biases: dict[str, str] = field(default_factory=dict)

    @property
    def projections(self) -> tuple[str, ...]:
        """Canonical projection names, in forward order: (gate_proj, up_proj, down_proj) or (up_proj, down_proj)."""
        return tuple(p for names in self.fused.values() for p in names)

    @property
    def input_param(self) -> str:
        """The fused parameter that reads the hidden states."""
        return next(iter(self.fused))

    @property
    def output_param(self) -> str:
        """The fused parameter that reads the gated activation (down_proj)."""
        return list(self.fused)[-1]

    def canonical(self, param: str, tensor: torch.Tensor) -> torch.Tensor:
        """`tensor` (the stored fused parameter `param`) as nn.Linear orientation [E, out, in] (a view)."""
        return tensor.transpose(-2, -1) if self.transposed else tensor

    def split(self, param: str, tensor: torch.Tensor) -> dict[str, torch.Tensor]:
        """Canonical per-projection tensors `{proj: [E, out, in]}` of the stored fused parameter (gate/up
        de-interleaved); works on biases ([E, out]) too when `param` names the weight they belong to."""
        names = self.fused[param]
        canon = self.canonical(param, tensor) if tensor.dim() == 3 else tensor
        rows = -2 if tensor.dim() == 3 else -1
        if len(names) == 1:
            return {names[0]: canon}
        if self.interleaved:
            return {name: _take_every(canon, rows, i, len(names)) for i, name in enumerate(names)}
        return dict(zip(names, canon.chunk(len(names), dim=rows), strict=True))

    def merge(self, param: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Inverse of `split`: the stored fused tensor from canonical per-projection tensors."""
        names = self.fused[param]
        tensors = [parts[n] for n in names]
        rows = -2 if tensors[0].dim() == 3 else -1
        if len(names) == 1:
            canon = tensors[0]
        elif self.interleaved:  # rows g0, u0, g1, u1, ...: a new axis just after the row axis, then flatten
            canon = torch.stack(tensors, dim=rows).flatten(rows - 1, rows) if rows == -2 else \
                torch.stack(tensors, dim=-1).flatten(-2, -1)
        else:
            canon = torch.cat(tensors, dim=rows)
        if canon.dim() == 3 and self.transposed:
            canon = canon.transpose(-2, -1)
        return canon.contiguous()


def _take_every(tensor: torch.Tensor, dim: int, start: int, step: int) -> torch.Tensor:
    index = [slice(None)] * tensor.dim()
    index[dim] = slice(start, None, step)
    return tensor[tuple(index)]


def experts_layout(module: nn.Module) -> ExpertsLayout | None:
    """The layout of a transformers fused-experts module (None for any other module)."""
    if not hasattr(module, "has_gate") or not hasattr(module, "is_transposed"):
        return None
    first = "gate_up_proj" if module.has_gate else "up_proj"
    if not isinstance(module._parameters.get(first), torch.Tensor) or \
            not isinstance(module._parameters.get("down_proj"), torch.Tensor):
        return None
    fused = {first: ("gate_proj", "up_proj") if module.has_gate else ("up_proj",), "down_proj": ("down_proj",)}
    biases = {p: f"{p}_bias" for p in fused if getattr(module, "has_bias", False) and f"{p}_bias" in module._parameters}
    return ExpertsLayout(fused=fused, transposed=bool(module.is_transposed),
                         interleaved=module.has_gate and not getattr(module, "is_concatenated", True), biases=biases)


def expert_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Every fused-experts module of the model, by module name."""
    return {name: m for name, m in model.named_modules() if experts_layout(m) is not None}


def checkpoint_expert_names(model: nn.Module, module_name: str) -> dict[tuple[int, str], str] | None:
    """The state-dict key the model's own `save_pretrained` writes for each expert's projection weight:
    `{(expert, canonical proj): key}` (e.g. qwen3_moe `(0, "gate_proj")` -> `model.layers.1.mlp.experts.0.
    gate_proj.weight`; mixtral `...block_sparse_moe.experts.0.w1.weight`; nemotron_h `backbone.layers...`), or
    None where `save_pretrained` keeps the experts fused (gpt_oss).

    Found by running transformers' own `revert_weight_conversion` on a stand-in state dict whose every
    (expert, projection) slice holds a distinct value, so no family's renaming is re-typed here. The stand-in
    has the experts' count but 2 x 3 values per slice: the reversal splits, transposes and renames, which a
    constant slice survives, and a full-size stand-in of a 30B MoE would be gigabytes per layer.
    """
    from transformers.core_model_loading import revert_weight_conversion

    module = model.get_submodule(module_name)
    layout = experts_layout(module)
    if layout is None:
        raise ModelError(f"{module_name} is not a fused-experts module")
    tags: dict[float, tuple[int, str]] = {}
    state = {}
    for param in layout.fused:
        count = module._parameters[param].shape[0]
        parts = {}
        for proj in layout.fused[param]:
            values = torch.empty(count, 2, 3)
            for e in range(count):
                tag = float(len(tags) + 1)
                tags[tag] = (e, proj)
                values[e] = tag
            parts[proj] = values
        state[f"{module_name}.{param}"] = layout.merge(param, parts)
    saved = revert_weight_conversion(model, state)
    if any(key.endswith(param) for key in saved for param in layout.fused):
        return None  # kept fused
    out = {}
    for key, tensor in saved.items():
        tag = float(tensor.flatten()[0])
        if tag in tags and bool((tensor == tag).all()):
            out[tags[tag]] = key
    if len(out) != len(tags):
        raise ModelError(f"cannot map the saved expert names of {module_name}: {len(out)} of {len(tags)} found")
    return out


# --- What stays in high precision by rule ---------------------------------------------------------------------
# Every peer (ModelOpt, llm-compressor, NVIDIA's published NVFP4 checkpoints) keeps these in BF16; the coverage
# report (quant/apply.py) names the rule for each kept tensor, and a block weight no rule covers is an error.
MAMBA_SSM_PARAMETERS = ("A_log", "D", "dt_bias")


def high_precision_rule(module: nn.Module, param_name: str, tensor: torch.Tensor) -> str | None:
    """Why parameter `param_name` of `module` stays in high precision by default (None: no rule; it should be
    quantized). Family knowledge lives here: routers, Mamba's conv1d and state-space parameters, norms."""
    kind = type(module).__name__
    if "Router" in kind:
        return "MoE router (kept in high precision by every peer; routing must stay exact)"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Conv1d):
        return "Mamba conv1d (kept in high precision by every peer)"
    if param_name in MAMBA_SSM_PARAMETERS:
        return "Mamba state-space parameter (A, D, dt)"
    if "Norm" in kind or "norm" in param_name:
        return "norm"
    if param_name.endswith("bias"):
        return "bias (added in high precision after its GEMM)"
    if tensor.dim() <= 1:
        return "1-D parameter (gains, sinks and per-channel vectors stay in high precision)"
    return None


def block_kind(block: nn.Module) -> str:
    """The kind of a decoder block by its mixer: mamba, attention, moe or mlp (a Llama-like block with attention
    and an MLP or MoE is 'attention+mlp' / 'attention+moe'). nemotron_h's blocks hold one mixer each."""
    mixer = getattr(block, "mixer", None)
    if isinstance(mixer, nn.Module):  # nemotron_h / granitemoehybrid style: one mixer per block
        kind = type(mixer).__name__
        for word, name in (("Mamba", "mamba"), ("Attention", "attention"), ("MoE", "moe"), ("MLP", "mlp")):
            if word in kind:
                return name
    kinds = []
    names = {n.rsplit(".", 1)[-1] for n, _ in block.named_modules()}
    if names & {"mamba", "mixer"} and any("Mamba" in type(m).__name__ for m in block.modules()):
        kinds.append("mamba")
    if names & {"self_attn", "attention", "attn"}:
        kinds.append("attention")
    if any(experts_layout(m) is not None for m in block.modules()):
        kinds.append("moe")
    elif names & {"mlp", "feed_forward", "block_sparse_moe"}:
        kinds.append("mlp")
    return "+".join(kinds) or "other"


def fused_kernel_mixers(model: nn.Module) -> list[nn.Module]:
    """Mamba2 mixers (nemotron_h's Mamba2Mixer, granitemoehybrid's MambaLayer, falcon_h1's Mixer: the modules
    with in_proj, out_proj and A_log): in training mode without a cache their forward
    calls `mamba_split_conv1d_scan_combined` (mamba-ssm or a hub kernel, on GPU) with `out_proj.weight` itself,
    which would bypass a fake-quantized out_proj. Their eval-mode forward calls `self.in_proj` and `self.out_proj`
    as modules; `self.training` selects nothing else in these mixers (transformers 5.25)."""
    return [m for m in model.modules() if isinstance(getattr(m, "out_proj", None), nn.Module)
            and isinstance(getattr(m, "in_proj", None), nn.Module) and "A_log" in m._parameters]
