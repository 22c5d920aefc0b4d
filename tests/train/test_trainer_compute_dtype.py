"""train/trainer.py's compute dtype: `--compute-dtype` chooses bf16 autocast per device, and under it a
served-arithmetic layer quantizes bf16 activations, as the served model does."""

from __future__ import annotations

import pytest
import torch

from ckaqad.errors import ConfigError
from ckaqad.formats import nvfp4
from ckaqad.formats.nvfp4_runtime import runtime_fake_quantize
from ckaqad.quant.apply import quantize_model_
from ckaqad.quant.linear import QuantConfig
from ckaqad.train.trainer import TrainConfig, autocast, bf16_compute


def test_compute_dtype_choices_and_the_error_naming_the_flag():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert (bf16_compute(cpu), bf16_compute(cuda)) == (False, True)  # auto: the defaults before the flag existed
    assert bf16_compute(cpu, "bfloat16") and not bf16_compute(cuda, "float32")
    with pytest.raises(ConfigError, match="--compute-dtype"):
        TrainConfig(compute_dtype="bf16")


def test_served_layer_under_bf16_autocast_quantizes_bf16_inputs():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32))
    quantize_model_(model, QuantConfig(arithmetic="runtime", exclude=()))
    layer = model[0]
    x = torch.randn(5, 64) * 3
    layer.input_amax.fill_(float(x.abs().amax()))
    with autocast(torch.device("cpu"), "bfloat16"):
        out = model(x)
    assert out.dtype == torch.bfloat16
    xq = runtime_fake_quantize(x.bfloat16(), nvfp4.reciprocal_global_scale(layer.input_amax))
    w = layer.quantized_weight().to(torch.bfloat16)
    expected = torch.nn.functional.linear(xq, w, layer.bias.to(torch.bfloat16))
    assert torch.equal(out, expected)
    # fp32 inputs quantized in fp32 give other block scales: the cast is what makes it the served model
    assert not torch.equal(runtime_fake_quantize(x, nvfp4.reciprocal_global_scale(layer.input_amax)).bfloat16(), xq)
