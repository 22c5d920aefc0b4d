"""tests for ckaqad/export/shards.py: safetensors files with an index, written one group of tensors at a time."""

from __future__ import annotations

import json

import pytest
import safetensors.torch
import torch

from ckaqad.errors import ConfigError
from ckaqad.export.shards import ShardWriter, read_weights, shard_name, weight_files, write_shards


def tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"embed.weight": torch.randn(40, 8, generator=g), "layers.0.weight": torch.randn(16, 8, generator=g),
            "layers.0.codes": torch.randint(0, 255, (16, 4), generator=g, dtype=torch.uint8),
            "layers.1.weight": torch.randn(16, 8, generator=g).bfloat16(), "norm.weight": torch.ones(8),
            "head.weight": torch.randn(100, 8, generator=g)}


def snapshot(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def test_the_files_depend_on_the_tensors_and_their_order_not_on_how_they_arrive(tmp_path):
    """One call with everything, or one tensor at a time (a gathered FSDP unit at a time): the same files."""
    at_once = tmp_path / "at_once"
    at_once.mkdir()
    write_shards(tensors(), at_once, shard_size_bytes=1024)
    streamed = tmp_path / "streamed"
    streamed.mkdir()
    writer = ShardWriter(streamed, shard_size_bytes=1024)
    for name, tensor in tensors().items():
        writer.add({name: tensor})
    writer.close()
    assert snapshot(at_once) == snapshot(streamed)
    # consecutive tensors up to 1024 bytes per file (512 + 64 + 256 + 32); the 1280-byte embedding and the
    # 3200-byte head each alone
    index = json.loads((at_once / "model.safetensors.index.json").read_text())
    names = [shard_name(i, 3) for i in range(1, 4)]
    assert index["weight_map"] == {"embed.weight": names[0], "layers.0.weight": names[1], "layers.0.codes": names[1],
                                   "layers.1.weight": names[1], "norm.weight": names[1], "head.weight": names[2]}
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors().values())
    assert sorted(p.name for p in at_once.iterdir()) == sorted([*names, "model.safetensors.index.json"])
    assert weight_files(at_once) == [at_once / n for n in names]
    back = read_weights(weight_files(at_once))
    assert back.keys() == tensors().keys() and all(torch.equal(back[k], v) for k, v in tensors().items())
    assert set(safetensors.torch.load_file(str(at_once / names[1]))) == {"layers.0.weight", "layers.0.codes",
                                                                          "layers.1.weight", "norm.weight"}


def test_everything_in_one_file_is_model_safetensors_without_an_index(tmp_path):
    write_shards(tensors(), tmp_path, shard_size_bytes=10**6)
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]
    assert weight_files(tmp_path) == [tmp_path / "model.safetensors"]
    with open(tmp_path / "model.safetensors", "rb") as f:  # the metadata save_pretrained writes
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert header["__metadata__"] == {"format": "pt"}


def test_bad_sizes_indexes_and_repeats_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="shard size must be positive"):
        ShardWriter(tmp_path, 0)
    writer = ShardWriter(tmp_path, 100)
    writer.add({"a": torch.zeros(2)})
    with pytest.raises(ValueError, match="added twice"):
        writer.add({"a": torch.zeros(2)})
    (tmp_path / "model.safetensors.index.json").write_text('{"metadata": {}}')
    with pytest.raises(ValueError, match="no weight_map"):
        weight_files(tmp_path)
