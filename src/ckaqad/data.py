"""Text data: local files packed into fixed-length token blocks with a held-out split.

Accepted `--data`: a `.txt` file (documents separated by blank lines), a `.jsonl` file (a `text` field, or
chat `messages` rendered with the tokenizer's chat template), a directory saved by
`datasets.Dataset.save_to_disk`, or a directory of such files. Nothing is downloaded.

Without `--data`, the built-in corpus (`default_corpus`) is used: the project's prompts
(`assets/prompts.txt`: coding, arithmetic, science, writing) answered once by the teacher and cached, plus
source text of Python standard-library modules already on the machine. It is teacher-generated
distillation data (what QAD recipes use) and needs no download.
"""

from __future__ import annotations

import hashlib
import json
import sysconfig
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from ckaqad.errors import DataError

# Stdlib modules whose source (code, docstrings and comments in English) joins the built-in corpus.
STDLIB_MODULES = ("textwrap", "bisect", "heapq", "fractions", "statistics", "shlex", "queue", "string",
                  "calendar", "colorsys", "difflib", "graphlib", "ipaddress", "json/decoder", "csv",
                  "functools", "contextlib", "dataclasses", "pprint", "random")
ANSWER_TOKENS = 160


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read data file {path}: {exc}") from exc


def render_chat(messages: list[dict], tokenizer) -> str:
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False)
    return "\n".join(f"{m['role']}: {m['content']}" for m in messages)


def _jsonl_documents(path: Path, tokenizer) -> list[str]:
    docs = []
    for number, line in enumerate(_read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number}: not valid JSON ({exc.msg})") from exc
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            docs.append(record["text"])
        elif isinstance(record, dict) and isinstance(record.get("messages"), list):
            docs.append(render_chat(record["messages"], tokenizer))
        else:
            raise DataError(f"{path}:{number}: expected a 'text' string or a 'messages' list")
    return docs


def _dataset_documents(path: Path, tokenizer) -> list[str]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"cannot load dataset directory {path}: {exc}") from exc
    if isinstance(ds, datasets.DatasetDict):
        ds = ds["train"] if "train" in ds else next(iter(ds.values()))
    if "text" in ds.column_names:
        return [t for t in ds["text"] if isinstance(t, str)]
    if "messages" in ds.column_names:
        return [render_chat(m, tokenizer) for m in ds["messages"]]
    raise DataError(f"dataset {path} has no 'text' or 'messages' column (columns: {ds.column_names})")


def load_documents(path: str | Path, tokenizer=None) -> list[str]:
    """Documents (non-empty strings) from a local file or directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise DataError(f"data path does not exist: {path}")
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            docs = _dataset_documents(path, tokenizer)
        else:
            files = sorted(p for p in path.rglob("*") if p.suffix in (".txt", ".jsonl"))
            docs = [d for f in files for d in load_documents(f, tokenizer)]
    elif path.suffix == ".jsonl":
        docs = _jsonl_documents(path, tokenizer)
    elif path.suffix in (".txt", ".md", ".text"):
        docs = [d.strip() for d in _read_text(path).split("\n\n")]
    else:
        raise DataError(f"unsupported data file {path}: use .txt, .jsonl or a datasets directory")
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise DataError(f"no text found in {path}")
    return docs


def project_prompts() -> list[str]:
    text = resources.files("ckaqad").joinpath("assets/prompts.txt").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def stdlib_documents() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for name in STDLIB_MODULES:
        path = root / f"{name}.py"
        if path.exists():
            docs.append(path.read_text(encoding="utf-8", errors="replace"))
    return docs


@torch.no_grad()
def teacher_answers(model, tokenizer, prompts: list[str], max_new_tokens: int = ANSWER_TOKENS,
                    batch_size: int = 16) -> list[str]:
    """Greedy chat answers of the teacher, rendered as full conversations (prompt + answer)."""
    device = next(model.parameters()).device
    rendered = [render_chat([{"role": "user", "content": p}], tokenizer) for p in prompts]
    if getattr(tokenizer, "chat_template", None):
        rendered = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                                  add_generation_prompt=True) for p in prompts]
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    docs = []
    try:
        for start in range(0, len(rendered), batch_size):
            chunk = rendered[start:start + batch_size]
            enc = tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
            answers = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
            docs.extend(prompt + answer.strip() for prompt, answer in zip(chunk, answers, strict=True))
    finally:
        tokenizer.padding_side = side
    return docs


def default_corpus(model, tokenizer, cache_dir: Path | None = None) -> list[str]:
    """The built-in corpus: teacher-answered project prompts (cached per teacher) + stdlib source."""
    from ckaqad.models import cache_root

    prompts = project_prompts()
    key = hashlib.sha256((getattr(model.config, "_name_or_path", "") + json.dumps(model.config.to_dict(),
                          sort_keys=True, default=str) + "".join(prompts)).encode()).hexdigest()[:16]
    cache = (cache_dir or cache_root() / "corpus") / f"answers-{key}.json"
    if cache.exists():
        answered = json.loads(cache.read_text())
    else:
        answered = teacher_answers(model, tokenizer, prompts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        tmp.write_text(json.dumps(answered))
        tmp.replace(cache)
    return answered + stdlib_documents()


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
