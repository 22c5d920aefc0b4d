"""Shared by the damage and recover command tests: a tiny teacher that has learnt something (so forgetting
has something to lose), a general corpus and the narrow one."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import make_tiny_model, make_tiny_tokenizer

from ckaqad.damage.forget import arithmetic_corpus

SEQ_LEN = 32


def general_corpus() -> str:
    """About 20 KB of varied English prose and code, 80 blank-line separated documents, deterministic."""
    subjects = ["The compiler", "A tensor", "Every layer", "The teacher", "Our student", "This function", "A block",
                "The river", "An old map", "The baker"]
    verbs = ["reads", "quantizes", "scales", "returns", "stores", "rounds", "computes", "checks", "follows", "draws"]
    objects = ["the weights", "sixteen values", "an index", "the hidden state", "each token", "the gradient",
               "the morning bread", "a long valley"]
    tails = ["before the next step.", "in float32.", "without a copy.", "at the end of the loop.", "twice.",
             "under the bridge.", "with great care."]
    docs = []
    for d in range(80):
        if d % 5 == 4:
            docs.append("\n".join(f"def f{d}_{i}(x):\n    return x * {i + d} + {d % 7}" for i in range(3)))
        else:
            docs.append(" ".join(f"{subjects[(d + i) % 10]} {verbs[(d * 3 + i) % 10]} {objects[(d + 2 * i) % 8]} "
                                 f"{tails[(d + i * i) % 7]}" for i in range(6)))
    return "\n\n".join(docs) + "\n"


def pretrained_tiny_teacher(directory: Path, steps: int = 120) -> None:
    """The tiny Llama after `steps` of CE on the general corpus (lr 3e-3), saved as an HF directory."""
    tokenizer = make_tiny_tokenizer()
    model = make_tiny_model(seed=0).train()
    ids = tokenizer(general_corpus(), add_special_tokens=False)["input_ids"]
    blocks = torch.tensor(ids[: len(ids) // SEQ_LEN * SEQ_LEN]).view(-1, SEQ_LEN)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        batch = blocks[torch.randint(0, blocks.shape[0], (8,), generator=g)]
        model(input_ids=batch, labels=batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval().save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def write_corpora(root: Path) -> tuple[Path, Path]:
    general, narrow = root / "general.txt", root / "narrow.txt"
    general.write_text(general_corpus())
    narrow.write_text(arithmetic_corpus(120))
    return general, narrow
