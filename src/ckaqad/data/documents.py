"""Documents: local text files and the built-in corpus (the `blocks` module packs them into token blocks).

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
from importlib import resources
from pathlib import Path

import torch

from ckaqad.errors import DataError
from ckaqad.files import write_json
from ckaqad.models.load import cache_root

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
    prompts = project_prompts()
    key = hashlib.sha256((getattr(model.config, "_name_or_path", "") + json.dumps(model.config.to_dict(),
                          sort_keys=True, default=str) + "".join(prompts)).encode()).hexdigest()[:16]
    cache = (cache_dir or cache_root() / "corpus") / f"answers-{key}.json"
    if cache.exists():
        answered = json.loads(cache.read_text())
    else:
        answered = teacher_answers(model, tokenizer, prompts)
        cache.parent.mkdir(parents=True, exist_ok=True)
        write_json(cache, answered, indent=None)
    return answered + stdlib_documents()
