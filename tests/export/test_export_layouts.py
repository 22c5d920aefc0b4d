"""tests for ckaqad/export/layouts.py: the layout registry, the global-scale encodings and the way back,
the config files, and `detect`."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import reciprocal

from ckaqad import __version__
from ckaqad.errors import ConfigError, ExportError
from ckaqad.export.layouts import (
    LAYOUTS,
    CompressedTensors,
    ModelOpt,
    amax_from_global,
    amax_from_reciprocal,
    compressed_tensors_config,
    detect,
    get_layout,
    modelopt_config,
    modelopt_hf_quant_config,
)
from ckaqad.formats import nvfp4


def test_registry_holds_one_entry_per_layout():
    assert LAYOUTS.names() == ["compressed-tensors", "modelopt"]
    assert isinstance(get_layout("compressed-tensors"), CompressedTensors)
    assert isinstance(get_layout("modelopt"), ModelOpt)
    entry = get_layout("modelopt")
    assert get_layout(entry) is entry
    assert entry.names.all() == ("weight", "weight_scale", "weight_scale_2", "input_scale")
    assert get_layout("compressed-tensors").names.of(False) == ("weight_packed", "weight_scale", "weight_global_scale")


def test_unknown_layout_lists_close_matches_and_the_valid_names():
    with pytest.raises(ConfigError) as info:
        get_layout("modelop")
    message = str(info.value)
    assert "--layout" in message and "(did you mean: modelopt?)" in message
    assert "choose from: compressed-tensors, modelopt" in message
    with pytest.raises(ConfigError, match="did you mean: compressed-tensors"):
        LAYOUTS.check("compressed_tensors")


def test_global_scale_recovery():
    amax = torch.rand(20_000, generator=torch.Generator().manual_seed(0)) * 30 + 1e-3
    g = nvfp4.global_scale_from_amax(amax)
    inverse = reciprocal(amax)
    # ModelOpt stores g itself: an amax giving exactly that g is found.
    assert all(torch.equal(nvfp4.global_scale_from_amax(amax_from_global(x)), x) for x in g[:2000])
    # compressed-tensors stores 2688/amax: the plain reciprocal misses g for a good share of amaxes ...
    naive = nvfp4.global_scale_from_amax(reciprocal(inverse))
    assert (naive != g).float().mean() > 0.02  # 7% of these
    # ... and the recorded exact amax restores it.
    for a, r, x in zip(amax[:2000], inverse[:2000], g[:2000], strict=True):
        assert torch.equal(nvfp4.global_scale_from_amax(amax_from_reciprocal(r, float(a).hex())), x)
    # a record that disagrees with the tensor is ignored
    wrong = amax_from_reciprocal(inverse[0], float(amax[0] * 2).hex())
    assert torch.equal(wrong, torch.tensor(nvfp4.GLOBAL_RANGE) / inverse[0])


def test_stored_globals_per_layout():
    weight_amax, input_amax = torch.tensor(3.25), torch.tensor(11.0)
    ct = get_layout("compressed-tensors").store_globals(weight_amax, input_amax)
    assert torch.equal(ct["weight_global_scale"], reciprocal(weight_amax))
    assert torch.equal(ct["input_global_scale"], reciprocal(input_amax))
    assert all(t.shape == (1,) and t.dtype == torch.float32 for t in ct.values())
    mo = get_layout("modelopt").store_globals(weight_amax, None)
    assert list(mo) == ["weight_scale_2"] and mo["weight_scale_2"].shape == ()
    assert torch.equal(mo["weight_scale_2"], nvfp4.global_scale_from_amax(weight_amax))


@pytest.mark.parametrize("w4a4", [True, False])
def test_config_files(w4a4):
    from compressed_tensors.quantization import QuantizationConfig

    ct, ct_files = get_layout("compressed-tensors").config_files(w4a4, ["lm_head"])
    assert ct_files == {} and ct == compressed_tensors_config(w4a4, ["lm_head"])
    assert QuantizationConfig.model_validate(ct).format == "nvfp4-pack-quantized"
    mo, mo_files = get_layout("modelopt").config_files(w4a4, ["lm_head"])
    hf_quant = mo_files["hf_quant_config.json"]
    assert hf_quant == modelopt_hf_quant_config(w4a4, ["lm_head"])
    assert hf_quant == {"producer": {"name": "ckaqad", "version": __version__},
                        "quantization": {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4",
                                         "kv_cache_quant_algo": None, "group_size": 16,
                                         "exclude_modules": ["lm_head"]}}
    assert mo == modelopt_config(hf_quant) and mo["quant_method"] == "modelopt"
    assert ("input_activations" in mo["config_groups"]["group_0"]) is w4a4


def write_config(directory, quantization_config=None, hf_quant=None):
    directory.mkdir(exist_ok=True)
    config = {"model_type": "llama"}
    if quantization_config is not None:
        config["quantization_config"] = quantization_config
    (directory / "config.json").write_text(json.dumps(config))
    if hf_quant is not None:
        (directory / "hf_quant_config.json").write_text(json.dumps(hf_quant))
    return directory


@pytest.mark.parametrize("w4a4", [True, False])
def test_detect_tells_the_layouts_and_schemes_apart(tmp_path, w4a4):
    ct = write_config(tmp_path / "ct", compressed_tensors_config(w4a4, []))
    found = detect(ct)
    assert found.layout is get_layout("compressed-tensors") and found.w4a4 is w4a4
    hf_quant = modelopt_hf_quant_config(w4a4, [])
    mo = write_config(tmp_path / "mo", modelopt_config(hf_quant), hf_quant)
    assert (detect(mo).layout.name, detect(mo).w4a4) == ("modelopt", w4a4)
    # without hf_quant_config.json, config.json's modelopt quantization_config is enough
    (mo / "hf_quant_config.json").unlink()
    assert (detect(mo).layout.name, detect(mo).w4a4) == ("modelopt", w4a4)


def test_detect_rejects_what_no_layout_reads(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ExportError, match="no config.json"):
        detect(empty)
    with pytest.raises(ExportError, match="no compressed-tensors or modelopt quantization_config"):
        detect(write_config(tmp_path / "plain"))
    with pytest.raises(ExportError, match="is not nvfp4-pack-quantized"):
        detect(write_config(tmp_path / "fp8", {"quant_method": "compressed-tensors", "format": "float-quantized"}))
    with pytest.raises(ExportError, match="quant_algo 'FP8'"):
        detect(write_config(tmp_path / "mo8", hf_quant={"quantization": {"quant_algo": "FP8"}}))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("[1, 2]")
    with pytest.raises(ExportError, match="does not hold a JSON object"):
        detect(tmp_path / "bad")
