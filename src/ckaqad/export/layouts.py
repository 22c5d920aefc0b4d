"""The on-disk layouts of an NVFP4 export, one entry per layout, registered in `LAYOUTS` under its `--layout`
spelling (docs/method.md#export-layouts). Both hold the same codes and block scales; they differ in tensor
names, in how they store the global scales and in their config files:

- `compressed-tensors` (vLLM, llm-compressor): `p.weight_packed`, `p.weight_scale`, `p.weight_global_scale`
  `[1]` = `448·6/amax` and, for W4A4, `p.input_global_scale` `[1]` = `448·6/act_amax`; config.json
  `quantization_config` built with compressed-tensors' own pydantic `QuantizationConfig`.
- `modelopt` (TensorRT-LLM, vLLM `modelopt_fp4`): `p.weight` (packed uint8), `p.weight_scale`,
  `p.weight_scale_2` scalar = `g = amax/(6·448)`, `p.input_scale` scalar for W4A4, plus hf_quant_config.json.

Each entry knows its local tensor names, how its stored global scales encode an amax and the way back
(exact where the layout allows it; `export.compress` explains why compressed-tensors needs
`ckaqad_scales.json`), its config files, how a serving stack reads its weights (for `export.verify`), and
whether an export directory holds it (`detect`).

>>> LAYOUTS.get("modelopt").names.weight_global
'weight_scale_2'
>>> LAYOUTS.names()
['compressed-tensors', 'modelopt']
"""

from __future__ import annotations

import abc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch

from ckaqad import __version__
from ckaqad.errors import ExportError
from ckaqad.formats import nvfp4
from ckaqad.formats.e2m1 import e2m1_grid
from ckaqad.paths import ExportDir
from ckaqad.registry import Registry

CT_FORMAT = "nvfp4-pack-quantized"
PRODUCER = {"name": "ckaqad", "version": __version__}


@dataclass(frozen=True)
class LocalNames:
    """Local tensor names of one quantized Linear `p` (the export holds `p.<name>`)."""

    packed: str
    """uint8 `[out, in/2]`, two E2M1 codes per byte, even column in the low nibble"""
    block_scales: str
    """float8_e4m3fn `[out, in/16]`"""
    weight_global: str
    """float32, the weight's global scale in the layout's encoding"""
    input_global: str
    """float32, the activation global scale (W4A4 only)"""

    def all(self) -> tuple[str, str, str, str]:
        return self.packed, self.block_scales, self.weight_global, self.input_global

    def of(self, w4a4: bool) -> tuple[str, ...]:
        """The names a layer of this scheme has (no input global for W4A16)."""
        return self.all() if w4a4 else self.all()[:3]


def read_json(path: Path) -> dict:
    """A JSON object from `path`; ExportError if it is unreadable or not an object."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ExportError(f"{path} does not hold a JSON object")
    return data


# ------------------------------------------------------------------------------ global-scale encodings


def reciprocal_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """compressed-tensors' global scale `448·6 / amax` (float32 scalar, CPU), the reciprocal of g:
    `nvfp4.reciprocal_global_scale` on CPU."""
    return nvfp4.reciprocal_global_scale(amax.detach().cpu())


def amax_from_global(g: torch.Tensor) -> torch.Tensor:
    """A float32 amax with `amax / 2688 == g` exactly (the nearest such to `g·2688`), from ModelOpt's g."""
    g = g.detach().float().cpu().reshape(())
    guess = g * nvfp4.GLOBAL_RANGE
    candidates = [guess]
    for direction in (float("inf"), float("-inf")):
        c = guess
        for _ in range(4):
            c = torch.nextafter(c, torch.tensor(direction))
            candidates.append(c)
    for c in candidates:
        if torch.equal(nvfp4.global_scale_from_amax(c), g):
            return c
    return guess


def amax_from_reciprocal(global_scale: torch.Tensor, exact_hex: str | None) -> torch.Tensor:
    """amax from compressed-tensors' `G = 2688/amax`: the recorded exact value (`ckaqad_scales.json`) when it
    maps to `G`, else `2688/G` (whose g may be one ulp off the student's; see `export.compress`)."""
    global_scale = global_scale.detach().float().cpu().reshape(())
    if exact_hex is not None:
        exact = torch.tensor(float.fromhex(exact_hex), dtype=torch.float32)
        if torch.equal(reciprocal_global_scale(exact), global_scale):
            return exact
    return torch.tensor(nvfp4.GLOBAL_RANGE, dtype=torch.float32) / global_scale


# ------------------------------------------------------------------------------------------- layouts


class Layout(abc.ABC):
    """One on-disk layout. Subclasses set the class attributes and implement the methods; `LAYOUTS` holds one
    instance of each."""

    name: ClassVar[str]
    names: ClassVar[LocalNames]
    serving_reader: ClassVar[str]
    """what `serving_weight` stands for, in `verify_export`'s report"""
    serving_exact: ClassVar[bool]
    """True when `serving_weight` must equal the student's weight exactly (else: within one ulp of its dtype)"""

    def __repr__(self) -> str:
        return f"<layout {self.name}>"

    @abc.abstractmethod
    def store_globals(self, weight_amax: torch.Tensor, input_amax: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The global-scale tensors of one layer under their local names (float32, CPU)."""

    @abc.abstractmethod
    def recover_amaxes(self, local: dict[str, torch.Tensor], recorded_weight: str | None,
                       recorded_input: str | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight global amax, input amax or None) from a layer's stored globals; `recorded_*` are the exact
        amaxes of `ckaqad_scales.json` (float hex) when the export has them."""

    @abc.abstractmethod
    def config_files(self, w4a4: bool, ignore: list[str]) -> tuple[dict, dict[str, dict]]:
        """(config.json `quantization_config`, {file name: JSON object} of extra files)."""

    @abc.abstractmethod
    def scheme_of(self, export: ExportDir, config: dict) -> bool | None:
        """None if `export` (config.json already read as `config`) is not of this layout, else whether it is
        W4A4; ExportError for an export of this layout that ckaqad cannot read."""

    @abc.abstractmethod
    def serving_weight(self, local: dict[str, torch.Tensor], quantization_config: dict) -> torch.Tensor:
        """A layer's dequantized weight `[out, in]` as the serving stacks compute it from the stored tensors."""


def _quantization_method(config: dict) -> tuple[dict | None, str | None]:
    qconfig = config.get("quantization_config")
    return (qconfig, qconfig.get("quant_method")) if isinstance(qconfig, dict) else (None, None)


def compressed_tensors_config(w4a4: bool, ignore: list[str]) -> dict:
    """config.json `quantization_config`, built and validated by compressed-tensors' own pydantic models and
    serialised the way its `ModelCompressor.update_config` writes it."""
    import compressed_tensors
    from compressed_tensors.quantization import QuantizationConfig, QuantizationStatus
    from compressed_tensors.quantization.quant_scheme import preset_name_to_scheme

    scheme = preset_name_to_scheme("NVFP4" if w4a4 else "NVFP4A16", ["Linear"])
    config = QuantizationConfig(config_groups={"group_0": scheme}, format=CT_FORMAT,
                                quantization_status=QuantizationStatus.COMPRESSED, ignore=list(ignore))
    return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
            "sparsity_config": {}, "transform_config": {},
            **config.model_dump(mode="json", exclude={"quant_method"})}


class CompressedTensors(Layout):
    """compressed-tensors `nvfp4-pack-quantized`: reciprocal global scales of shape `[1]`."""

    name = "compressed-tensors"
    names = LocalNames("weight_packed", "weight_scale", "weight_global_scale", "input_global_scale")
    serving_reader = "compressed-tensors NVFP4PackedCompressor"
    serving_exact = False  # it dequantizes `q·fl(s8/G)` in bfloat16

    def store_globals(self, weight_amax, input_amax):
        out = {self.names.weight_global: reciprocal_global_scale(weight_amax).reshape(1)}
        if input_amax is not None:
            out[self.names.input_global] = reciprocal_global_scale(input_amax).reshape(1)
        return out

    def recover_amaxes(self, local, recorded_weight, recorded_input):
        weight_amax = amax_from_reciprocal(local[self.names.weight_global], recorded_weight)
        stored_input = local.get(self.names.input_global)
        input_amax = amax_from_reciprocal(stored_input, recorded_input) if stored_input is not None else None
        return weight_amax, input_amax

    def config_files(self, w4a4, ignore):
        return compressed_tensors_config(w4a4, ignore), {}

    def scheme_of(self, export, config):
        qconfig, method = _quantization_method(config)
        if method != "compressed-tensors" or export.hf_quant_config.is_file():  # hf_quant_config.json: ModelOpt
            return None
        if qconfig.get("format") != CT_FORMAT:
            raise ExportError(f"{export.root}: compressed-tensors format {qconfig.get('format')!r} "
                              f"is not {CT_FORMAT}")
        groups = list((qconfig.get("config_groups") or {}).values())
        if len(groups) != 1 or not isinstance(groups[0], dict):
            raise ExportError(f"{export.root}: expected one compressed-tensors config group, got {len(groups)}")
        return bool(groups[0].get("input_activations"))

    def serving_weight(self, local, quantization_config):
        from compressed_tensors.compressors.nvfp4 import NVFP4PackedCompressor
        from compressed_tensors.quantization import QuantizationConfig

        scheme = QuantizationConfig.model_validate(quantization_config).config_groups["group_0"]
        weights = {k: local[k] for k in self.names.of(False)}
        return NVFP4PackedCompressor.decompress(weights, scheme)["weight"]


def modelopt_hf_quant_config(w4a4: bool, ignore: list[str]) -> dict:
    """hf_quant_config.json as ModelOpt writes it (docs/method.md#export-layouts)."""
    return {"producer": dict(PRODUCER),
            "quantization": {"quant_algo": "NVFP4" if w4a4 else "W4A16_NVFP4", "kv_cache_quant_algo": None,
                             "group_size": nvfp4.BLOCK_SIZE, "exclude_modules": list(ignore)}}


def modelopt_config(hf_quant_config: dict) -> dict:
    """config.json `quantization_config` for the modelopt layout, as ModelOpt's
    `convert_hf_quant_config_format` writes it (quant_method "modelopt"). ModelOpt writes no input group
    for W4A16_NVFP4; here the weights-only group is written so that the config says what the tensors hold.
    """
    quant = hf_quant_config["quantization"]
    args = {"dynamic": False, "num_bits": 4, "type": "float", "group_size": quant["group_size"]}
    group = {"weights": dict(args), "targets": ["Linear"]}
    if quant["quant_algo"] == "NVFP4":
        group["input_activations"] = dict(args)
    return {"config_groups": {"group_0": group}, "ignore": list(quant["exclude_modules"]),
            "quant_algo": quant["quant_algo"], "producer": dict(hf_quant_config["producer"]),
            "quant_method": "modelopt"}


class ModelOpt(Layout):
    """ModelOpt's unified HF checkpoint: g itself as float32 scalars (`.squeeze()` in its export)."""

    name = "modelopt"
    names = LocalNames("weight", "weight_scale", "weight_scale_2", "input_scale")
    serving_reader = "code * s8 * g"
    serving_exact = True
    ALGOS: ClassVar[dict[str, bool]] = {"NVFP4": True, "W4A16_NVFP4": False}  # quant_algo -> W4A4

    def store_globals(self, weight_amax, input_amax):
        out = {self.names.weight_global: nvfp4.global_scale_from_amax(weight_amax.detach().float().cpu()).reshape(())}
        if input_amax is not None:
            out[self.names.input_global] = nvfp4.global_scale_from_amax(input_amax.detach().float().cpu()).reshape(())
        return out

    def recover_amaxes(self, local, recorded_weight, recorded_input):
        # g itself is stored: the exact amax is found from it alone, the record is not needed.
        weight_amax = amax_from_global(local[self.names.weight_global])
        stored_input = local.get(self.names.input_global)
        return weight_amax, (amax_from_global(stored_input) if stored_input is not None else None)

    def config_files(self, w4a4, ignore):
        hf_quant_config = modelopt_hf_quant_config(w4a4, ignore)
        return modelopt_config(hf_quant_config), {ExportDir.HF_QUANT_CONFIG: hf_quant_config}

    def scheme_of(self, export, config):
        qconfig, method = _quantization_method(config)
        if export.hf_quant_config.is_file():
            quant = read_json(export.hf_quant_config).get("quantization", {})
        elif method == "modelopt":
            quant = qconfig
        else:
            return None
        algo = quant.get("quant_algo") if isinstance(quant, dict) else None
        if algo not in self.ALGOS:
            raise ExportError(f"{export.root}: ModelOpt quant_algo {algo!r} is not {' or '.join(self.ALGOS)}")
        return self.ALGOS[algo]

    def serving_weight(self, local, quantization_config):
        codes = nvfp4.unpack(local[self.names.packed])
        scales = local[self.names.block_scales].float().repeat_interleave(nvfp4.BLOCK_SIZE, dim=-1)
        return e2m1_grid()[codes.long()] * (scales * local[self.names.weight_global].float())


LAYOUTS: Registry[Layout] = Registry("export layout", flag="--layout")
LAYOUTS.register(CompressedTensors.name, CompressedTensors())
LAYOUTS.register(ModelOpt.name, ModelOpt())


def get_layout(layout: str | Layout) -> Layout:
    """The layout entry spelled `layout` (ConfigError listing close matches and the valid names otherwise)."""
    return layout if isinstance(layout, Layout) else LAYOUTS.get(layout)


@dataclass(frozen=True)
class Detected:
    """What `detect` found in an export directory."""

    layout: Layout
    w4a4: bool
    config: dict
    """config.json, parsed"""


def detect(export_dir: str | Path) -> Detected:
    """The layout and scheme of the export in `export_dir` (from config.json and hf_quant_config.json);
    ExportError if it holds none."""
    export = ExportDir(Path(export_dir))
    if not export.config.is_file():
        raise ExportError(f"{export.root} is not an NVFP4 export (no config.json)")
    config = read_json(export.config)
    for layout in LAYOUTS.names():
        entry = LAYOUTS.get(layout)
        w4a4 = entry.scheme_of(export, config)
        if w4a4 is not None:
            return Detected(entry, w4a4, config)
    raise ExportError(f"{export.root} is not an NVFP4 export (config.json has no "
                      f"{' or '.join(LAYOUTS.names())} quantization_config)")
