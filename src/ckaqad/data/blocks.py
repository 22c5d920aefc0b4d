"""Token blocks: documents packed into fixed-length blocks with a document-level held-out split, and the
batch iterators over them (training order a pure function of (seed, step), so resumes see the same data), and
each rank's slice of a global batch (`rank_slice`) under torchrun.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from ckaqad.data.documents import default_corpus, load_documents
from ckaqad.errors import DataError


def pack_documents(docs: list[str], tokenizer, seq_len: int) -> torch.Tensor:
    """(N, seq_len) int64 blocks of the concatenated token stream, documents separated by EOS."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for doc in docs:
        stream.extend(tokenizer(doc, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@dataclass
class DataConfig:
    data: str | None = None
    """local .txt/.jsonl file or datasets directory; none for the built-in corpus"""
    seq_len: int = 256
    """tokens per packed block"""
    heldout_fraction: float = 0.1
    """share of documents held out for evaluation"""

    def __post_init__(self) -> None:
        if self.seq_len < 8:
            raise DataError(f"--seq-len must be at least 8, got {self.seq_len}")
        if not 0 < self.heldout_fraction < 1:
            raise DataError(f"--heldout-fraction must be between 0 and 1, got {self.heldout_fraction}")


@dataclass
class TokenBlocks:
    """Packed train and held-out blocks, each (N, seq_len) int64."""

    train: torch.Tensor
    heldout: torch.Tensor
    source: str

    def describe(self) -> str:
        seq = self.train.shape[1]
        return (f"{self.source}: {self.train.shape[0]} train and {self.heldout.shape[0]} held-out blocks "
                f"of {seq} tokens")


def split_documents(docs: list[str], heldout_fraction: float) -> tuple[list[str], list[str]]:
    """Deterministic document-level split (no block straddles both sides): every k-th document held out."""
    if len(docs) < 2:
        raise DataError("need at least two documents to make a held-out split")
    every = max(2, round(1 / heldout_fraction))
    heldout = docs[every - 1::every] or docs[-1:]
    train = [d for i, d in enumerate(docs) if (i + 1) % every != 0] if docs[every - 1::every] else docs[:-1]
    return train, heldout


def build_blocks(docs: list[str], tokenizer, seq_len: int, heldout_fraction: float = 0.1,
                 source: str = "data", max_seq_len: int | None = None) -> TokenBlocks:
    if seq_len < 8:
        raise DataError(f"--seq-len must be at least 8, got {seq_len}")
    if max_seq_len is not None and seq_len > max_seq_len:
        raise DataError(f"--seq-len {seq_len} is longer than the model's maximum {max_seq_len}")
    train_docs, heldout_docs = split_documents(docs, heldout_fraction)
    train = pack_documents(train_docs, tokenizer, seq_len)
    heldout = pack_documents(heldout_docs, tokenizer, seq_len)
    if len(train) == 0 or len(heldout) == 0:
        raise DataError(f"{source} is too short for blocks of {seq_len} tokens "
                        f"({len(train)} train, {len(heldout)} held-out); use more text or a smaller --seq-len")
    return TokenBlocks(train=train, heldout=heldout, source=source)


def load_blocks(config: DataConfig, model, tokenizer) -> TokenBlocks:
    """Blocks from `config.data`, or from the built-in corpus when it is None."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    if max_len is not None and config.seq_len > max_len:
        raise DataError(f"--seq-len {config.seq_len} is longer than the model's maximum {max_len}")
    if config.data is None:
        docs, source = default_corpus(model, tokenizer), "built-in corpus"
    else:
        docs, source = load_documents(config.data, tokenizer), str(config.data)
    return build_blocks(docs, tokenizer, config.seq_len, config.heldout_fraction, source=source, max_seq_len=max_len)


def train_batches(blocks: torch.Tensor, batch_size: int, seed: int, start: int = 0,
                  device: torch.device | str = "cpu") -> Iterator[dict[str, torch.Tensor]]:
    """Endless training batches in an epoch-wise shuffled order that is a pure function of (seed, step), so a
    resumed run sees exactly the batches an uninterrupted one would."""
    n = blocks.shape[0]
    step = start
    while True:
        # Position p of the endless stream is block order_e[p % n] of epoch e = p // n: every epoch is one
        # permutation, also when a batch straddles two epochs or batch_size exceeds n.
        position = torch.arange(step * batch_size, (step + 1) * batch_size)
        epoch = position // n
        index = torch.empty(batch_size, dtype=torch.long)
        for e in epoch.unique().tolist():
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))
            index[epoch == e] = order[position[epoch == e] % n]
        ids = blocks[index].to(device)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        step += 1


def eval_batches(blocks: torch.Tensor, batch_size: int, device: torch.device | str = "cpu",
                 limit: int | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """The held-out blocks in order, each once (the first `limit` blocks if given)."""
    n = blocks.shape[0] if limit is None else min(limit, blocks.shape[0])
    for start in range(0, n, batch_size):
        ids = blocks[start:min(start + batch_size, n)].to(device)
        yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def rank_slice(batch: dict[str, torch.Tensor], rank: int, world: int) -> dict[str, torch.Tensor]:
    """Rank `rank`'s contiguous share of a global batch (B/world blocks; B must divide): the N ranks' slices in
    rank order are the global batch, so N ranks of b blocks see what one process of N·b blocks sees."""
    size = batch["input_ids"].shape[0]
    if size % world:
        raise DataError(f"a global batch of {size} blocks does not split over {world} processes; "
                        "make --batch-size a multiple of the number of processes")
    share = size // world
    return {k: v[rank * share:(rank + 1) * share] for k, v in batch.items()}
