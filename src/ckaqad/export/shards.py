"""Safetensors weights split over several files with an index, the layout `save_pretrained` writes for large
models (and transformers, vLLM and compressed-tensors read): `model.safetensors` when everything fits one file,
else `model-0000i-of-0000N.safetensors` plus `model.safetensors.index.json`
(`{"metadata": {"total_size": bytes}, "weight_map": {tensor name: file name}}`).

`ShardWriter` takes tensors one group at a time (a decoder block, one gathered FSDP unit) and writes each file
as soon as it is full, so a writer never holds more than one file's tensors: the full state dict is never
assembled. The grouping is a pure function of the tensors' order and sizes, so the same tensors in the same
order give the same files byte for byte, however they arrive (one process's state dict, or gathered from N
ranks' shards). Both the export directory (`paths.ExportDir`) and the student directory (`paths.StudentDir`)
use it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import safetensors.torch as safetensors_torch
import torch
from safetensors import SafetensorError

from ckaqad.errors import ConfigError
from ckaqad.files import write_json
from ckaqad.paths import ExportDir

SINGLE_FILE = ExportDir.SINGLE_SHARD  # == StudentDir.WEIGHTS
INDEX_FILE = ExportDir.SHARD_INDEX  # == StudentDir.SHARD_INDEX
# 2 GiB per file (transformers 5.25's save_pretrained defaults to 50 GB): a writer holds one file's tensors, so
# the file size bounds the memory of the streaming write, and smaller files download and resume better.
DEFAULT_SHARD_SIZE_BYTES = 2 * 1024 ** 3
METADATA = {"format": "pt"}  # what save_pretrained writes; transformers warns on a file without it


def shard_name(index: int, count: int) -> str:
    """The file name of shard `index` (1-based) of `count`, as transformers names them."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def tensor_bytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


class ShardWriter:
    """Write tensors into `directory` as safetensors shards of at most `shard_size_bytes` each (a bigger
    tensor goes alone), consecutive tensors together in the order added; `close()` names the files and writes
    the index. The directory must not be visible to readers yet (write into `files.atomic_directory`'s temp
    dir): shards are written under temporary names until `close()` knows how many there are.

    >>> import tempfile
    >>> with tempfile.TemporaryDirectory() as d:
    ...     w = ShardWriter(Path(d), shard_size_bytes=8)
    ...     w.add({"a": torch.zeros(2), "b": torch.zeros(2), "c": torch.zeros(3)})
    ...     sorted(p.name for p in w.close())
    ['model-00001-of-00002.safetensors', 'model-00002-of-00002.safetensors', 'model.safetensors.index.json']
    """

    def __init__(self, directory: Path, shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES) -> None:
        if shard_size_bytes <= 0:
            raise ConfigError(f"shard size must be positive, got {shard_size_bytes} bytes")
        self.directory = Path(directory)
        self.shard_size_bytes = shard_size_bytes
        self._pending: dict[str, torch.Tensor] = {}
        self._pending_bytes = 0
        self._written: list[tuple[Path, list[str]]] = []  # (temporary path, tensor names)
        self.total_bytes = 0
        self.sizes: dict[str, int] = {}  # tensor name -> bytes, of everything added

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        """Append tensors (CPU, contiguous; copied by safetensors when their file is written)."""
        for name, tensor in tensors.items():
            if name in self.sizes:
                raise ValueError(f"tensor {name} added twice")  # an internal invariant, not user input
            nbytes = tensor_bytes(tensor)
            if self._pending and self._pending_bytes + nbytes > self.shard_size_bytes:
                self._flush()
            self._pending[name] = tensor
            self._pending_bytes += nbytes
            self.sizes[name] = nbytes
            self.total_bytes += nbytes

    def _flush(self) -> None:
        path = self.directory / f".shard-{len(self._written):05d}.tmp"
        safetensors_torch.save_file(self._pending, str(path), metadata=METADATA)
        self._written.append((path, list(self._pending)))
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> list[Path]:
        """Write the last shard, give every shard its final name and write the index (none for one file).
        Returns the files written."""
        if self._pending or not self._written:
            self._flush()
        if len(self._written) == 1:
            path, _ = self._written[0]
            os.replace(path, self.directory / SINGLE_FILE)
            return [self.directory / SINGLE_FILE]
        weight_map: dict[str, str] = {}
        out = []
        for i, (path, names) in enumerate(self._written, start=1):
            final = self.directory / shard_name(i, len(self._written))
            os.replace(path, final)
            weight_map.update(dict.fromkeys(names, final.name))
            out.append(final)
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.directory / INDEX_FILE, index, sort_keys=True)
        return [*out, self.directory / INDEX_FILE]


def write_shards(tensors: dict[str, torch.Tensor], directory: Path,
                 shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES) -> list[Path]:
    """`tensors` written at once through a `ShardWriter`; returns the files."""
    writer = ShardWriter(directory, shard_size_bytes)
    writer.add(tensors)
    return writer.close()


def weight_files(directory: Path) -> list[Path]:
    """The safetensors files of a weights directory: those its index names (in name order), else
    `model.safetensors`. A missing file is the caller's to report (see `missing_files`). ValueError for an
    index without a weight map."""
    index = Path(directory) / INDEX_FILE
    if not index.is_file():
        return [Path(directory) / SINGLE_FILE]
    weight_map = json.loads(index.read_text()).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no weight_map")
    return [Path(directory) / name for name in sorted(set(weight_map.values()))]


def has_weights(directory: Path) -> bool:
    """Whether `directory` holds `model.safetensors` or a shard index."""
    return (Path(directory) / SINGLE_FILE).is_file() or (Path(directory) / INDEX_FILE).is_file()


def read_weights(files: list[Path], device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of the safetensors `files` on `device`. OSError or SafetensorError for an unreadable file."""
    tensors: dict[str, torch.Tensor] = {}
    for path in files:
        tensors.update(safetensors_torch.load_file(str(path), device=str(device)))
    return tensors


READ_ERRORS = (OSError, ValueError, SafetensorError)  # what reading a damaged weights directory raises
