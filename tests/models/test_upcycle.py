"""tests for ckaqad/models/upcycle.py and the routing measurement of commands/upcycle.py: an exact copy of the
dense function at noise 0, perturbed experts at noise > 0, and the shifted-routing KL that says whether
routing matters."""

from __future__ import annotations

import pytest
import torch

from ckaqad.capture import router_modules
from ckaqad.commands.upcycle import routing_sensitivity, shifted_routers
from ckaqad.errors import ConfigError
from ckaqad.models.upcycle import UpcycleConfig, upcycle
from tests.conftest import make_tiny_model


def ids() -> torch.Tensor:
    return torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))


def test_noise_zero_upcycling_computes_the_dense_function():
    dense = make_tiny_model()
    moe = upcycle(dense, UpcycleConfig(experts=4, top_k=2, noise=0.0))
    assert type(moe).__name__ == "MixtralForCausalLM" and len(router_modules(moe)) == dense.config.num_hidden_layers
    with torch.no_grad():
        assert torch.allclose(moe(input_ids=ids()).logits, dense(input_ids=ids()).logits, atol=1e-5)
    experts = moe.model.layers[0].mlp.experts
    assert torch.equal(experts.gate_up_proj[0], experts.gate_up_proj[3])


def test_noise_perturbs_each_expert_by_its_relative_std():
    dense = make_tiny_model()
    moe = upcycle(dense, UpcycleConfig(experts=4, top_k=2, noise=0.1, seed=1))
    mlp, experts = dense.model.layers[1].mlp, moe.model.layers[1].mlp.experts
    delta = (experts.down_proj - mlp.down_proj.weight).detach()
    assert not torch.equal(experts.down_proj[0], experts.down_proj[1])
    assert float(delta.std() / mlp.down_proj.weight.std()) == pytest.approx(0.1, rel=0.05)


def test_shifted_routing_matters_only_when_experts_differ():
    dense = make_tiny_model()
    blocks = torch.randint(0, 259, (4, 16), generator=torch.Generator().manual_seed(2))
    same = routing_sensitivity(upcycle(dense, UpcycleConfig(noise=0.0)), blocks, 2, 4)
    different = routing_sensitivity(upcycle(dense, UpcycleConfig(noise=0.3)), blocks, 2, 4)
    assert same["kl_per_token_shifted_routing"] < 1e-9 < different["kl_per_token_shifted_routing"]
    assert different["router_jaccard_shifted_routing"] < 0.5  # the shift moved (almost) every choice


def test_shifted_routers_roll_the_router_rows():
    moe = upcycle(make_tiny_model(), UpcycleConfig())
    shifted = shifted_routers(moe)
    assert torch.equal(router_modules(shifted)[0].weight[1], router_modules(moe)[0].weight[0])


def test_config_checks():
    with pytest.raises(ConfigError, match="--experts"):
        UpcycleConfig(experts=2, top_k=3)
    with pytest.raises(ConfigError, match="--noise"):
        UpcycleConfig(noise=-1)
