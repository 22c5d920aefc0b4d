"""Weights quantized once per optimizer step (`quant.linear.StepQuantizedWeights`,
`quant.apply.weights_quantized_once_per_step`, opened by `train.trainer.train_step`): the same losses,
gradients and updates as quantizing at every forward, one quantization per weight per step, and the held
copies dropped before the optimizer changes the weights."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_model
from moe_helpers import make_tiny_moe

from ckaqad.capture import LayerMap
from ckaqad.formats import nvfp4
from ckaqad.objectives.compose import Composite, ObjectiveConfig
from ckaqad.paths import RunDir
from ckaqad.quant.apply import (
    calibrate,
    quant_experts,
    quant_linears,
    quantize_model_,
    weights_quantized_once_per_step,
)
from ckaqad.quant.linear import QuantConfig
from ckaqad.train.checkpointer import CheckpointConfig
from ckaqad.train.trainer import TrainConfig, Trainee, make_captures, make_optimizer, train_step

pytestmark = pytest.mark.usefixtures("one_thread")


class _Tok:
    bos_token_id = 256


def trainee(once: bool, loss: str = "kl+cka", grad_accum: int = 3, **quant) -> tuple[Trainee, list[dict]]:
    teacher = make_tiny_model(seed=0).requires_grad_(False)
    student = copy.deepcopy(teacher)
    quantize_model_(student, QuantConfig(**quant))
    gen = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 256, (2, 32), generator=gen)} for _ in range(2 * grad_accum)]
    for b in batches:
        b["attention_mask"] = torch.ones_like(b["input_ids"])
    calibrate(student, batches[:1])
    student.train().requires_grad_(True)
    cfg = TrainConfig(steps=10, batch_size=2, grad_accum=grad_accum, cka_tokens=32, progress=False, lr=1e-2,
                      quantize_once_per_step=once)
    optimizer, scheduler = make_optimizer(student, cfg)
    return Trainee(config=cfg, teacher=teacher, student=student, tokenizer=_Tok(), blocks=None,
                   layer_map=LayerMap.parse("proportional", 2, 2), objective=Composite(ObjectiveConfig(loss=loss)),
                   optimizer=optimizer, scheduler=scheduler, checkpoint=CheckpointConfig(), run=RunDir(Path(".")),
                   evaluate=dict), batches


def run_steps(t: Trainee, batches: list[dict], steps: int = 2) -> list:
    captures = make_captures(t)
    data = iter(batches)
    records = [train_step(t, step, data, captures) for step in range(steps)]
    captures.remove()
    return records


@pytest.mark.parametrize("quant", [dict(), dict(clip_gradient=True, weight_global="frozen"),
                                   dict(arithmetic="runtime"), dict(format="mxfp4", scheme="w4a16")],
                         ids=["nvfp4-w4a4", "clipped-frozen", "runtime", "mxfp4-w4a16"])
def test_two_steps_with_accumulation_equal_the_per_forward_path_bit_for_bit(quant):
    """grad_accum 3, two optimizer steps (so the second step must see the updated weights): same losses,
    grad norms and weights, exactly."""
    cached, batches = trainee(True, **quant)
    plain, _ = trainee(False, **quant)
    a, b = run_steps(cached, batches), run_steps(plain, batches)
    assert [(r.loss, r.kl, r.cka_term, r.grad_norm) for r in a] == [(r.loss, r.kl, r.cka_term, r.grad_norm) for r in b]
    for (name, p), q in zip(cached.student.named_parameters(), plain.student.parameters(), strict=True):
        assert torch.equal(p, q), name
    assert all(m._step_held is None for m in quant_linears(cached.student).values())  # dropped after the step


def test_each_weight_is_quantized_once_per_step_and_requantized_after_the_update(monkeypatch):
    t, batches = trainee(True, loss="kl", grad_accum=3, scheme="w4a16")
    calls = []
    real = nvfp4.fake_quantize

    def counting(x, *args, **kwargs):
        calls.append(x.shape)
        return real(x, *args, **kwargs)

    monkeypatch.setattr(nvfp4, "fake_quantize", counting)
    layers = len(quant_linears(t.student))
    run_steps(t, batches, steps=2)
    assert len(calls) == 2 * layers  # not 2 steps x 3 micro-batches x layers
    t.config.quantize_once_per_step = False
    calls.clear()
    run_steps(t, batches[:3], steps=1)
    assert len(calls) == 3 * layers


def test_the_gradient_through_the_held_weight_equals_the_straight_through_one():
    """One layer, two backward passes through the same held weight (two micro-batches): each gradient equals
    the uncached layer's, including the clipped mask."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(32, 8)
    with torch.no_grad():
        linear.weight[0, :4] *= 50  # values beyond the frozen amax, so the clip mask matters
    model = torch.nn.Sequential(linear)
    quantize_model_(model, QuantConfig(clip_gradient=True, weight_global="frozen", scheme="w4a16", exclude=()))
    layer = model[0]
    layer.weight_amax.fill_(1.0)
    xs = [torch.randn(4, 32) for _ in range(2)]
    expected = []
    for x in xs:
        layer.weight.grad = None
        layer(x).square().sum().backward()
        expected.append(layer.weight.grad.clone())
    with weights_quantized_once_per_step(model):
        for x, want in zip(xs, expected, strict=True):
            layer.weight.grad = None
            out = layer(x)
            out.square().sum().backward()
            assert torch.equal(layer.weight.grad, want)
        assert set(layer._step_held) == {"weight"}
    assert layer._step_held is None
    with torch.no_grad(), weights_quantized_once_per_step(model):  # no grad: no holding (evaluations hold their own)
        layer(xs[0])
        assert layer._step_held == {}


@pytest.mark.parametrize("quant", [dict(scheme="w4a16"),
                                   dict(scheme="w4a16", clip_gradient=True, weight_global="frozen")],
                         ids=["plain", "clipped-frozen"])
def test_fused_experts_hold_their_weights_with_the_same_gradients(quant):
    """The mixin on the second module kind (quant/experts.py): two micro-batches through held expert weights
    accumulate exactly the gradients of quantizing at every forward, and each weight is held once."""
    grads = []
    for once in (True, False):
        model = make_tiny_moe("qwen3_moe")
        quantize_model_(model, QuantConfig(**quant))
        ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))
        calibrate(model, [{"input_ids": ids}])
        model.train().requires_grad_(True)
        experts = quant_experts(model)
        assert experts
        if quant.get("clip_gradient"):  # frozen amaxes below the weights' own, so the clip mask has zeros
            for m in experts.values():
                for param in m.layout.fused:
                    m._buffers[f"{param}_weight_amax"].mul_(0.5)
        with weights_quantized_once_per_step(model) if once else contextlib.nullcontext():
            for micro in range(2):
                model(input_ids=ids.roll(micro, 1), labels=ids).loss.backward()
            if once:
                assert all(set(m._step_held) == set(m.layout.fused) for m in experts.values())
        grads.append([p.grad.clone() for p in model.parameters() if p.grad is not None])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))
    if quant.get("clip_gradient"):
        assert any((g == 0).any() for g in grads[0])
