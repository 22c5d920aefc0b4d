"""HumanEval with a model: prompt styles, completions cut at the stop sequences, and the canonical-solution
NLL. A fake-quant student's weights are quantized once per call (`quant.apply.cached_quantized_weights`)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from ckaqad.errors import ConfigError, DataError, ModelError
from ckaqad.eval.humaneval.problems import check_problems, positive_int
from ckaqad.quant.apply import cached_quantized_weights

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The standard HumanEval stop sequences (Codex paper): a completion ends before the first of them."""

INSTRUCT_REQUEST = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                    "```python\n{prompt}\n```\n")
INSTRUCT_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"
"""The instruct prompt style is lm-eval's `humaneval_instruct` task: the user turn asks for a solution, the
assistant turn is prefilled with INSTRUCT_PREFIX so the model continues the function body, and the body ends
at the closing code fence (or a standard stop sequence). Chat-tuned models left to complete a bare prompt
mostly close the turn or explain the code instead, which measures the prompt format, not the model."""

FENCE = "```"
PROMPT_STYLES = ("completion", "instruct")


def model_device(model, device) -> torch.device:
    """`device` if given, else the device of the model's first parameter (cpu for a model without any)."""
    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def resolve_prompt_style(style: str, tokenizer) -> str:
    """`auto` is `instruct` for a tokenizer with a chat template, else `completion`."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "instruct" if has_template else "completion"
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown HumanEval prompt style {style!r}; choose auto, {', '.join(PROMPT_STYLES)}")
    if style == "instruct" and not has_template:
        raise ConfigError("the instruct HumanEval prompt needs a tokenizer with a chat template")
    return style


def generation_input(tokenizer, prompt: str, style: str) -> list[int]:
    """Token ids the model continues: the bare prompt, or the chat-rendered request plus the prefilled
    assistant turn (INSTRUCT_PREFIX). Either way the continuation is the function body."""
    if style == "completion":
        return _encode(tokenizer, prompt)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCT_REQUEST.format(prompt=prompt)}],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(chat + INSTRUCT_PREFIX.format(prompt=prompt), add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def canonical_nll(
    model,
    tokenizer,
    problems: Sequence[dict],
    batch_size: int = 8,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Mean negative log-likelihood (nats/token) of each ``canonical_solution`` given its ``prompt``.

    ``prompt`` and ``prompt + canonical_solution`` are tokenized; the solution tokens are those after
    the longest common prefix of the two (so a token merged across the boundary is scored). Batches are
    right-padded with an attention mask, which does not change the result. Returns, per problem in
    input order, ``{"task_id", "nll": float, "tokens": int}`` (``tokens`` = number of scored tokens).
    """
    from tqdm.auto import tqdm

    check_problems(problems)
    positive_int("batch_size", batch_size)
    dev = model_device(model, device)
    pad_id = _pad_id(tokenizer)

    encoded: list[tuple[list[int], int]] = []  # (full ids, index of the first scored token)
    for problem in problems:
        prompt_ids = _encode(tokenizer, problem["prompt"])
        full_ids = _encode(tokenizer, problem["prompt"] + problem["canonical_solution"])
        start = 0
        for a, b in zip(prompt_ids, full_ids, strict=False):
            if a != b:
                break
            start += 1
        start = max(start, 1)  # the first token has nothing to condition on
        if start >= len(full_ids):
            raise DataError(f"{problem['task_id']}: the canonical solution has no tokens to score")
        encoded.append((full_ids, start))

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[dict | None] = [None] * len(encoded)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad(), cached_quantized_weights(model):
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc="HumanEval NLL", disable=not progress):
                width = max(len(encoded[i][0]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = encoded[i][0]
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(dev), attention_mask=attention.to(dev)).logits
                vocab = logits.shape[-1]
                chunk = max(1, 2**24 // vocab)  # float32 log-softmax of at most 16M entries at a time
                for row, i in enumerate(batch):
                    ids, start = encoded[i]
                    targets = torch.tensor(ids, dtype=torch.long, device=logits.device)
                    total = 0.0
                    for a in range(start, len(ids), chunk):
                        b = min(a + chunk, len(ids))
                        logp = torch.log_softmax(logits[row, a - 1 : b - 1].float(), dim=-1)
                        total -= float(logp.gather(-1, targets[a:b, None]).sum(dtype=torch.float64))
                    n = len(ids) - start
                    results[i] = {"task_id": problems[i]["task_id"], "nll": total / n, "tokens": n}
                del logits
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def summarize_nll(rows: Sequence[dict]) -> dict:
    """Aggregate :func:`canonical_nll` rows.

    Returns ``{"nll_token_mean"`` (sum of all token NLLs / all tokens), ``"nll_problem_mean"`` (mean of
    the per-problem means), ``"tokens"``, ``"problems"}``.
    """
    if not rows:
        raise DataError("no NLL rows to summarize")
    tokens = sum(int(r["tokens"]) for r in rows)
    if tokens <= 0:
        raise DataError("NLL rows hold no scored tokens")
    return {
        "nll_token_mean": sum(float(r["nll"]) * int(r["tokens"]) for r in rows) / tokens,
        "nll_problem_mean": sum(float(r["nll"]) for r in rows) / len(rows),
        "tokens": tokens,
        "problems": len(rows),
    }


# ------------------------------------------------------------------------------------------- generation


def truncate_completion(text: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """``text`` cut just before the earliest stop sequence (unchanged if none occurs)."""
    cut = len(text)
    for stop in stop_sequences:
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def make_stop_criteria(tokenizer, prompt_len: int, stop_sequences: Sequence[str]):
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopOnSequences(StoppingCriteria):
        """Per-row done flag: the generated text (after the prompt) contains a stop sequence."""

        def __init__(self) -> None:
            self.done: torch.Tensor | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None or self.done.shape[0] != input_ids.shape[0]:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            todo = (~self.done).nonzero().flatten().tolist()
            if todo:
                texts = tokenizer.batch_decode(input_ids[todo, prompt_len:], skip_special_tokens=True)
                for row, text in zip(todo, texts, strict=True):
                    if any(stop in text for stop in stop_sequences):
                        self.done[row] = True
            return self.done.to(input_ids.device)

    return StoppingCriteriaList([_StopOnSequences()])


def generate_completions(
    model,
    tokenizer,
    problems: Sequence[dict],
    max_new_tokens: int = 384,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    prompt_style: str = "completion",
) -> list[dict]:
    """Complete each prompt with ``model.generate`` and cut at :data:`STOP_SEQUENCES`.

    ``prompt_style`` is ``completion`` (the bare HumanEval prompt, the Codex protocol) or ``instruct``
    (chat template and prefilled answer, see :data:`INSTRUCT_PREFIX`; the body also ends at a code fence).

    ``temperature == 0`` is greedy (one generation, repeated ``num_samples`` times); otherwise nucleus
    sampling with ``temperature``/``top_p`` under ``seed`` (the global RNG state is restored afterwards).
    Batches are left-padded; a tokenizer without pad token gets ``pad_token = eos_token``. Returns
    ``len(problems) * num_samples`` rows ``{"task_id", "completion": str, "sample": int}``, in problem
    order then sample order.
    """
    from tqdm.auto import tqdm

    check_problems(problems)
    positive_int("max_new_tokens", max_new_tokens)
    positive_int("batch_size", batch_size)
    positive_int("num_samples", num_samples)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    do_sample = temperature > 0
    runs = num_samples if do_sample else 1

    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"unknown HumanEval prompt style {prompt_style!r}; choose {', '.join(PROMPT_STYLES)}")
    stops = STOP_SEQUENCES + ((FENCE,) if prompt_style == "instruct" else ())
    prompt_ids = [generation_input(tokenizer, p["prompt"], prompt_style) for p in problems]
    jobs = sorted(
        ((pi, s) for pi in range(len(problems)) for s in range(runs)), key=lambda j: -len(prompt_ids[j[0]])
    )
    texts: dict[tuple[int, int], str] = {}
    dev = model_device(model, None)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if tokenizer.eos_token_id is not None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)  # 0: no top-k cut

    old_side = tokenizer.padding_side
    was_training = getattr(model, "training", False)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad(), cached_quantized_weights(model):
            torch.manual_seed(seed)
            batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
            for batch in tqdm(batches, desc="HumanEval generate", disable=not progress):
                enc = tokenizer.pad(
                    {"input_ids": [prompt_ids[pi] for pi, _ in batch]}, padding=True, return_tensors="pt"
                )
                width = enc["input_ids"].shape[1]
                out = model.generate(
                    input_ids=enc["input_ids"].to(dev),
                    attention_mask=enc["attention_mask"].to(dev),
                    stopping_criteria=make_stop_criteria(tokenizer, width, stops),
                    **gen_kwargs,
                )
                for row, job in enumerate(batch):
                    ids = prompt_ids[job[0]]
                    gen = out[row, width:].tolist()
                    prefix = tokenizer.decode(ids, skip_special_tokens=True)
                    full = tokenizer.decode(ids + gen, skip_special_tokens=True)
                    # decoding prompt+generation keeps word-boundary spaces that a lone decode may drop
                    text = (
                        full[len(prefix) :]
                        if full.startswith(prefix)
                        else tokenizer.decode(gen, skip_special_tokens=True)
                    )
                    texts[job] = truncate_completion(text, stops)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)

    return [
        {"task_id": p["task_id"], "completion": texts[(pi, s if do_sample else 0)], "sample": s}
        for pi, p in enumerate(problems)
        for s in range(num_samples)
    ]
