"""Sparse upcycling (Komatsuzaki et al. 2022): a Mixture-of-Experts model built from a dense Llama-style model,
so that a realistic MoE exists offline (docs/moe_export.md#the-upcycled-model). Every decoder block's MLP becomes
`experts` copies of itself, each perturbed by independent Gaussian noise of `noise` times the weight's own
standard deviation, behind a new top-`top_k` softmax router (normal, std `router_std`); everything else
(embeddings, attention, norms, head) is copied unchanged. The result is a transformers `MixtralForCausalLM`
(Mixtral's attention, norms and SiLU-gated experts are Llama's), so transformers runs it natively and its
`save_pretrained` writes the per-expert checkpoint names vLLM reads. With `noise=0` it computes exactly the
dense model's function (the top-k weights are renormalised to 1 and every expert is the MLP); the noise and
the router give the experts something to differ by, and CE training (`commands/upcycle.py`) makes routing
matter.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ckaqad.errors import ConfigError, ModelError
from ckaqad.models.arch import decoder_layers


@dataclass
class UpcycleConfig:
    experts: int = 4
    """experts per MoE layer (copies of the dense MLP)"""
    top_k: int = 2
    """experts each token is routed to"""
    noise: float = 0.01
    """std of the perturbation of each expert copy, relative to the std of the weight it perturbs"""
    router_std: float = 0.02
    """std of the new routers' normal initialisation"""
    seed: int = 0
    """seed of the perturbation and the routers"""

    def __post_init__(self) -> None:
        if self.experts < 2 or not 1 <= self.top_k <= self.experts:
            raise ConfigError(f"--experts must be >= 2 and --top-k in 1..experts, got {self.experts} and {self.top_k}")
        if self.noise < 0 or self.router_std < 0:
            raise ConfigError(f"--noise and --router-std must be >= 0, got {self.noise} and {self.router_std}")


def mixtral_config(dense_config, config: UpcycleConfig):
    """The MixtralConfig of the upcycled model: the dense Llama config's sizes, `experts` experts of the MLP's
    width, top-`top_k` routing. ModelError for a dense model Mixtral cannot reproduce (biases, another act)."""
    from transformers import MixtralConfig

    if dense_config.model_type != "llama":
        raise ModelError(f"upcycling reads a Llama-style model; this one is {dense_config.model_type!r}")
    if getattr(dense_config, "attention_bias", False) or getattr(dense_config, "mlp_bias", False) \
            or dense_config.hidden_act != "silu":
        raise ModelError("upcycling into Mixtral needs a Llama without biases and with SiLU (Mixtral's experts)")
    keep = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
            "head_dim", "max_position_embeddings", "rms_norm_eps", "rope_parameters", "tie_word_embeddings",
            "bos_token_id", "eos_token_id", "pad_token_id", "initializer_range", "hidden_act")
    values = {k: getattr(dense_config, k) for k in keep if getattr(dense_config, k, None) is not None}
    return MixtralConfig(**values, intermediate_size=dense_config.intermediate_size, num_local_experts=config.experts,
                         num_experts_per_tok=config.top_k, sliding_window=None, router_jitter_noise=0.0,
                         architectures=["MixtralForCausalLM"])


def _perturbed(weight: torch.Tensor, count: int, noise: float, generator: torch.Generator) -> torch.Tensor:
    """`count` copies of `weight` stacked on a new first axis, each plus N(0, (noise·std(weight))²)."""
    base = weight.detach().float()
    copies = base.unsqueeze(0).repeat(count, *([1] * base.dim()))
    if noise > 0:
        copies += noise * base.std() * torch.randn(copies.shape, generator=generator)
    return copies


@torch.no_grad()
def upcycle(dense: nn.Module, config: UpcycleConfig) -> nn.Module:
    """The MixtralForCausalLM (float32, eval mode) upcycled from the Llama `dense` (module docstring)."""
    from transformers import MixtralForCausalLM

    moe = MixtralForCausalLM(mixtral_config(dense.config, config)).float().eval()
    generator = torch.Generator().manual_seed(config.seed)
    missing = moe.load_state_dict({k: v.float() for k, v in dense.state_dict().items() if ".mlp." not in k},
                                  strict=False).missing_keys
    unexpected = [k for k in missing if ".mlp." not in k and k != "lm_head.weight"]
    if unexpected:
        raise ModelError(f"upcycling: the dense model has no {unexpected[:3]}")
    for dense_block, moe_block in zip(decoder_layers(dense), decoder_layers(moe), strict=True):
        mlp, experts = dense_block.mlp, moe_block.mlp.experts
        gate_up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight], dim=0)  # [2I, H]: gate rows, then up
        experts.gate_up_proj.copy_(_perturbed(gate_up, config.experts, config.noise, generator))
        experts.down_proj.copy_(_perturbed(mlp.down_proj.weight, config.experts, config.noise, generator))
        moe_block.mlp.gate.weight.normal_(0.0, config.router_std, generator=generator)
    if moe.config.tie_word_embeddings:
        moe.tie_weights()
    return moe
