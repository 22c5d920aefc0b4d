"""How to fake-quantize fused MoE experts: step time of the candidate mechanisms, side by side in one run.

Timed: one forward + backward of a Qwen3-MoE experts layer (transformers 5.25 `Qwen3MoeExperts`, fused 3-D
`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I]) on T tokens routed top-k, NVFP4 W4A16 (the weight path is
what differs; the activation quantizers are the same calls in every mechanism), median over repeats:

- `bf16 experts (no quant)`: the unquantized module, as the baseline;
- `class swap (ckaqad)`: `quant/experts.py`, the fused parameters read through properties that fake-quantize
  each expert with its own global scale: on CPU the reference quantizer once on [E, out, in] with a broadcast
  [E, 1, 1] amax (no fast backend takes a per-expert amax today);
- `class swap, per-expert calls`: the same, each expert through the format's 2-D entry point (what runs where
  a fast backend serves the tensor);
- `parametrization`: `torch.nn.utils.parametrize` on both fused parameters with the same per-expert fake quant
  (renames the parameters in the state dict to `parametrizations.<p>.original`);
- `per-expert Linear`: llm-compressor's `linearize_moe` style: 3·E QuantLinear layers (gate/up as fused
  siblings) and a loop over the routed experts.

Every mechanism uses the model's own `experts_implementation` (grouped_mm) except per-expert Linear, which
cannot. The outputs are checked equal to the class swap's before timing.

    python benchmarks/bench_moe_quant.py [--json out.json] [--repeats N] [--small]
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import device_header, print_table, time_fn, write_json  # noqa: E402

from ckaqad.formats import nvfp4  # noqa: E402
from ckaqad.quant import experts as quant_experts  # noqa: E402
from ckaqad.quant.linear import QuantConfig, QuantLinear, SiblingGroup  # noqa: E402


@dataclass(frozen=True)
class Shape:
    experts: int
    hidden: int
    intermediate: int
    tokens: int
    top_k: int
    name: str


# Scaled-down versions of real MoE layers (the 2-core CPU cannot hold Qwen3-30B-A3B's 128 x 768 x 2048 experts in
# float32 with gradients): the expert count, top-k and the I/H ratio are the models'.
CPU_SHAPES = (Shape(128, 256, 96, 256, 8, "Qwen3-30B-A3B ratios (E128 k8, H/8)"),
              Shape(8, 512, 1792, 256, 2, "Mixtral ratios (E8 k2, H/8)"),
              Shape(32, 256, 256, 256, 4, "GPT-OSS-20B ratios (E32 k4, H/11)"))
SMALL_SHAPES = (Shape(8, 64, 32, 32, 2, "tiny"),)
GPU_SHAPES = (Shape(128, 2048, 768, 4096, 8, "Qwen3-30B-A3B layer"), Shape(8, 4096, 14336, 4096, 2, "Mixtral layer"))


def experts_module(shape: Shape, device: torch.device) -> nn.Module:
    from transformers import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeExperts

    config = Qwen3MoeConfig(hidden_size=shape.hidden, moe_intermediate_size=shape.intermediate,
                            num_experts=shape.experts, num_experts_per_tok=shape.top_k)
    config._experts_implementation = "grouped_mm"
    module = Qwen3MoeExperts(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        module.gate_up_proj.copy_(torch.randn(module.gate_up_proj.shape, generator=generator) * 0.02)
        module.down_proj.copy_(torch.randn(module.down_proj.shape, generator=generator) * 0.02)
    return module.to(device)


def per_expert_fake_quantize(weight: torch.Tensor, amax: torch.Tensor | None, config: QuantConfig) -> torch.Tensor:
    """The per-expert loop: each expert through `nvfp4.fake_quantize` with its scalar amax."""
    return torch.stack([nvfp4.fake_quantize(weight[e], amax[e]) for e in range(weight.shape[0])])


class ExpertFakeQuant(nn.Module):
    """A parametrization of a fused [E, out, in] parameter: per-expert NVFP4 with its own amax."""

    def __init__(self, config: QuantConfig) -> None:
        super().__init__()
        self.config = config

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        amax = weight.detach().abs().amax(dim=(-2, -1)).float()
        return quant_experts.fake_quantize_expert_weights(weight, amax, self.config)


class LinearizedExperts(nn.Module):
    """Per-expert QuantLinear layers (llm-compressor's linearize_moe), gate/up sharing a global scale."""

    def __init__(self, fused: nn.Module, config: QuantConfig) -> None:
        super().__init__()
        self.act_fn = fused.act_fn
        self.experts = nn.ModuleList()
        for e in range(fused.num_experts):
            gate, up = fused.gate_up_proj[e].detach().chunk(2, dim=0)
            expert = nn.Module()
            for name, weight in (("gate_proj", gate), ("up_proj", up), ("down_proj", fused.down_proj[e].detach())):
                linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device=weight.device)
                linear.weight = nn.Parameter(weight.clone())
                setattr(expert, name, QuantLinear(linear, config))
            SiblingGroup([expert.gate_proj, expert.up_proj])
            self.experts.append(expert)

    def forward(self, hidden_states, top_k_index, top_k_weights):
        final = torch.zeros_like(hidden_states)
        mask = F.one_hot(top_k_index, num_classes=len(self.experts)).permute(2, 1, 0)
        for e in torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()[:, 0].tolist():
            top_k_pos, token_idx = torch.where(mask[e])
            expert, h = self.experts[e], hidden_states[token_idx]
            h = expert.down_proj(self.act_fn(expert.gate_proj(h)) * expert.up_proj(h))
            final.index_add_(0, token_idx, h * top_k_weights[token_idx, top_k_pos, None])
        return final


def mechanisms(shape: Shape, device: torch.device, config: QuantConfig) -> dict[str, nn.Module]:
    base = experts_module(shape, device)
    swapped = quant_experts.quantize_experts_(copy.deepcopy(base), config)
    looped = quant_experts.quantize_experts_(copy.deepcopy(base), config)
    looped.per_expert = True
    parametrized = copy.deepcopy(base)
    for name in ("gate_up_proj", "down_proj"):
        torch.nn.utils.parametrize.register_parametrization(parametrized, name, ExpertFakeQuant(config))
    return {"bf16 experts (no quant)": base, "class swap (ckaqad)": swapped, "class swap, per-expert calls": looped,
            "parametrization": parametrized, "per-expert Linear": LinearizedExperts(base, config)}


def run(module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    if not getattr(module, "per_expert", False):
        return module(x, index, weights)
    original = quant_experts.fake_quantize_expert_weights
    quant_experts.fake_quantize_expert_weights = per_expert_fake_quantize
    try:
        return module(x, index, weights)
    finally:
        quant_experts.fake_quantize_expert_weights = original


def step(module: nn.Module, x: torch.Tensor, index: torch.Tensor, weights: torch.Tensor) -> None:
    run(module, x, index, weights).square().mean().backward()


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--small", action="store_true", help="one tiny shape (the test suite's smoke run)")
    args = parser.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMALL_SHAPES if args.small else (GPU_SHAPES if device.type == "cuda" else CPU_SHAPES)
    config = QuantConfig(scheme="w4a16")
    header = {**device_header(device), "dtype": "float32", "scheme": "nvfp4 w4a16"}
    rows, records = [], []
    for shape in shapes:
        generator = torch.Generator().manual_seed(1)
        x = torch.randn(shape.tokens, shape.hidden, generator=generator).to(device)
        logits = torch.randn(shape.tokens, shape.experts, generator=generator).to(device)
        weights, index = torch.topk(logits.softmax(-1), shape.top_k, dim=-1)
        modules = mechanisms(shape, device, config)
        reference = modules["class swap (ckaqad)"](x, index, weights).detach()
        baseline_s = None
        for name, module in modules.items():
            with torch.no_grad():
                out = run(module, x, index, weights)
            if name != "bf16 experts (no quant)":
                torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-6)  # the same quantized layer
            seconds = time_fn(lambda m=module, x=x, i=index, w=weights: step(m, x, i, w), device, warmup=1,
                              repeats=args.repeats)
            baseline_s = baseline_s or seconds
            rows.append([shape.name, name, seconds * 1e3, seconds / baseline_s])
            records.append({**asdict(shape), "mechanism": name, "ms": seconds * 1e3, "vs_unquantized": seconds
                            / baseline_s})
    print_table("Fused-experts fake quant: forward + backward of one MoE layer", header,
                ["shape", "mechanism", "ms", "x unquantized"], rows)
    payload = {"header": header, "results": records}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
