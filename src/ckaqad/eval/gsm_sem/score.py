"""Scoring a model on GSM-SEM: originals and variants with the same prompt, greedy, answers extracted
(`####`, "The answer is", last number) and compared with the gold as exact fractions; then the accuracies,
the drop and the drop rate, P(variant right | original right), per strictness level and per mode, with
Wilson intervals, a cluster bootstrap over original problems for the drop, and McNemar's exact test for two
models on the same items.

Prompts (`PROMPT_STYLES`):
- `8shot`: the 8 standard GSM8K chain-of-thought exemplars ("Question: ...\\nAnswer: ... So the answer is N.")
  then "Question: {q}\\nAnswer:"; generation stops at the next "Question:" or a blank line (OLMES' gsm8k);
- `chat`: 0-shot, the question in the model's chat template with SOLVE_PROMPT (the solver's prompt).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from fractions import Fraction

import torch
from scipy.stats import binomtest, norm

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.gsm_sem.checks import LEVELS, at_least, extract_answer
from ckaqad.eval.gsm_sem.data import Variant, fewshot_exemplars, read_variants
from ckaqad.eval.gsm_sem.generate import SOLVE_PROMPT
from ckaqad.eval.humaneval.generate import make_stop_criteria, model_device
from ckaqad.quant.apply import cached_quantized_weights

PROMPT_STYLES = ("8shot", "chat")
FEWSHOT_STOPS = ("Question:", "\n\n")
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 2000


def prompt_text(question: str, style: str, tokenizer) -> str:
    """The text the model continues for `question` under `style` (see the module docstring)."""
    if style == "8shot":
        shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in fewshot_exemplars())
        return f"{shots}Question: {question}\nAnswer:"
    if style == "chat":
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError("--gsm-sem-prompt chat needs a tokenizer with a chat template; use 8shot")
        return tokenizer.apply_chat_template([{"role": "user", "content": SOLVE_PROMPT.format(question=question)}],
                                             tokenize=False, add_generation_prompt=True)
    raise ConfigError(f"unknown GSM-SEM prompt {style!r}; choose {', '.join(PROMPT_STYLES)}")


def solve_greedy(model, tokenizer, questions: Sequence[str], style: str = "8shot", max_new_tokens: int = 256,
                 batch_size: int = 8, progress: bool = True) -> list[str]:
    """Greedy completions of `questions` (left-padded batches, longest first; batching does not change a
    greedy completion beyond float noise), cut at the style's stop sequences."""
    from tqdm.auto import tqdm

    prompts = [prompt_text(q, style, tokenizer) for q in questions]
    add_special = style == "8shot"  # a chat template already holds its special tokens
    ids = [list(tokenizer(p, add_special_tokens=add_special)["input_ids"]) for p in prompts]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    stops = FEWSHOT_STOPS if style == "8shot" else ()
    out: dict[int, str] = {}
    device = model_device(model, None)
    old_side, was_training = tokenizer.padding_side, model.training
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.no_grad(), cached_quantized_weights(model):
            batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc="GSM-SEM solve", disable=not progress):
                enc = tokenizer.pad({"input_ids": [ids[i] for i in batch]}, padding=True, return_tensors="pt")
                width = enc["input_ids"].shape[1]
                generated = model.generate(
                    input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                    max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                    stopping_criteria=make_stop_criteria(tokenizer, width, stops) if stops else None)
                for row, i in enumerate(batch):
                    text = tokenizer.decode(generated[row, width:], skip_special_tokens=True)
                    cut = min((text.find(s) for s in stops if s in text), default=len(text))
                    out[i] = text[:cut]
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)
    return [out[i] for i in range(len(questions))]


def score_model(model, tokenizer, variants: Sequence[Variant], style: str = "8shot", max_new_tokens: int = 256,
                batch_size: int = 8, progress: bool = True) -> dict:
    """Every original (once per problem) and every variant answered by `model`. Returns {"originals":
    {problem id: {"correct", "answer", "completion"}}, "variants": [{"problem", "mode", "level", "correct",
    "answer", "completion"}]} with answers as exact-fraction text (None: no number found)."""
    if not variants:
        raise DataError("no GSM-SEM variants to score (none reached the requested level?)")
    originals = {v.problem.id: v.problem for v in variants}
    questions = [p.question for p in originals.values()] + [v.text for v in variants]
    completions = solve_greedy(model, tokenizer, questions, style, max_new_tokens, batch_size, progress)

    def judged(text: str, gold: str) -> dict:
        answer = extract_answer(text)
        return {"correct": answer is not None and answer == Fraction(gold),
                "answer": None if answer is None else str(answer), "completion": text}

    orig_rows = {pid: judged(c, p.gold) for (pid, p), c in zip(originals.items(), completions, strict=False)}
    var_rows = [{"problem": v.problem.id, "mode": v.mode, "level": v.level, **judged(c, v.problem.gold)}
                for v, c in zip(variants, completions[len(originals):], strict=True)]
    return {"originals": orig_rows, "variants": var_rows}


# --------------------------------------------------------------------------------------------- statistics


def wilson(successes: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The Wilson score interval of a binomial proportion ((nan, nan) for n = 0)."""
    if n == 0:
        return (math.nan, math.nan)
    z = float(norm.ppf(0.5 + confidence / 2))
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


def _drop(clusters: Sequence[tuple[bool, list[bool]]]) -> float:
    """acc on the originals − acc on the variants, over (original right, [variants right]) clusters."""
    n_var = sum(len(v) for _, v in clusters)
    if not clusters or not n_var:
        return math.nan
    return sum(o for o, _ in clusters) / len(clusters) - sum(sum(v) for _, v in clusters) / n_var


def cluster_bootstrap(clusters: Sequence[tuple[bool, list[bool]]], resamples: int = BOOTSTRAP_RESAMPLES,
                      seed: int = 0, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Percentile interval of the drop, resampling original problems (each with all its variants) with
    replacement: variants of one problem are not independent, so they are drawn together."""
    if len(clusters) < 2:
        return (math.nan, math.nan)
    rng = random.Random(seed)
    draws = sorted(_drop([clusters[rng.randrange(len(clusters))] for _ in clusters]) for _ in range(resamples))
    draws = [d for d in draws if not math.isnan(d)]
    lo = draws[int((1 - confidence) / 2 * (len(draws) - 1))]
    hi = draws[int((1 + confidence) / 2 * (len(draws) - 1))]
    return (lo, hi)


def summarize(scored: dict, variants_filter=lambda row: True, seed: int = 0) -> dict:
    """The metrics over the variant rows `variants_filter` keeps and their originals: acc_orig, acc_var (each
    with its Wilson interval), drop (with the cluster-bootstrap interval), drop_rate, p_var_given_orig."""
    rows = [r for r in scored["variants"] if variants_filter(r)]
    by_problem: dict[str, list[bool]] = {}
    for r in rows:
        by_problem.setdefault(r["problem"], []).append(bool(r["correct"]))
    clusters = [(bool(scored["originals"][pid]["correct"]), v) for pid, v in by_problem.items()]
    n_orig, n_var = len(clusters), len(rows)
    orig_right = sum(o for o, _ in clusters)
    var_right = sum(sum(v) for _, v in clusters)
    after_right = [x for o, v in clusters if o for x in v]
    acc_orig = orig_right / n_orig if n_orig else math.nan
    drop = _drop(clusters)
    return {"n_orig": n_orig, "n_var": n_var, "acc_orig": acc_orig, "acc_orig_ci": wilson(orig_right, n_orig),
            "acc_var": var_right / n_var if n_var else math.nan, "acc_var_ci": wilson(var_right, n_var),
            "drop": drop, "drop_ci": cluster_bootstrap(clusters, seed=seed),
            "drop_rate": drop / acc_orig if n_orig and acc_orig > 0 else math.nan,
            "p_var_given_orig": sum(after_right) / len(after_right) if after_right else math.nan}


def metrics_table(scored: dict, seed: int = 0) -> dict:
    """{"all": summary, "level:<L>": summary of variants at L or stricter, "mode:<M>": ...} (empty groups left
    out)."""
    table = {"all": summarize(scored, seed=seed)}
    for level in LEVELS:
        if any(at_least(r["level"], level) for r in scored["variants"]):
            table[f"level:{level}"] = summarize(scored, lambda r, lv=level: at_least(r["level"], lv), seed)
    for mode in dict.fromkeys(r["mode"] for r in scored["variants"]):
        table[f"mode:{mode}"] = summarize(scored, lambda r, m=mode: r["mode"] == m, seed)
    return table


def mcnemar(a: Sequence[bool], b: Sequence[bool]) -> dict:
    """McNemar's exact test of two models on the same items (paired correctness lists): b = only A right,
    c = only B right, p the two-sided binomial p-value of b among b + c (1.0 when they never disagree)."""
    if len(a) != len(b):
        raise DataError(f"McNemar needs the same items for both models, got {len(a)} and {len(b)}")
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
    return {"only_a": only_a, "only_b": only_b, "n": len(a), "p_value": float(p)}


def paired_correctness(scored: dict) -> list[bool]:
    """Variant correctness in item order, the list two models' McNemar test pairs."""
    return [bool(r["correct"]) for r in scored["variants"]]


def select_variants(path: str, level: str, limit: int | None = None) -> tuple[list[Variant], list[str]]:
    """(the variants in `path` at `level` or stricter, the first `limit`; the warnings about the file);
    ConfigError when no variant is at that level."""
    every, warnings = read_variants(path)
    chosen = [v for v in every if at_least(v.level, level)][:limit]
    if not chosen:
        raise ConfigError(f"no GSM-SEM variant in {path} reached level {level} "
                          f"(levels there: {', '.join(sorted({str(v.level) for v in every}))})")
    return chosen, warnings


HEADLINE = ("acc_orig", "acc_var", "drop", "drop_rate", "p_var_given_orig")


def headline(metrics: dict) -> dict[str, float]:
    """The flat `gsm_sem.<metric>` numbers of a metrics_table's `all` group (for study cells and eval.md)."""
    return {f"gsm_sem.{key}": metrics["all"][key] for key in HEADLINE}


def evaluate(model, tokenizer, variants_path: str, level: str, prompt: str = "8shot", max_new_tokens: int = 256,
             batch_size: int = 8, limit: int | None = None, seed: int = 0, progress: bool = True) -> dict:
    """One model on the variants of `variants_path` at `level` or stricter and their originals: {"metrics":
    metrics_table, "warnings", "originals", "variants"} (what `ckaqad eval --suite gsm-sem` and study cells record)."""
    chosen, warnings = select_variants(variants_path, level, limit)
    scored = score_model(model, tokenizer, chosen, prompt, max_new_tokens, batch_size, progress)
    return {"metrics": metrics_table(scored, seed=seed), "level": level, "prompt": prompt, "warnings": warnings,
            **scored}
