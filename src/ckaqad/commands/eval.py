"""`ckaqad eval`: measure any teacher, PTQ student, trained run or export the same way, offline.

Suites (`eval.suites.SUITES`): `fidelity` (needs the teacher: held-out KL, perplexity, top-1 agreement,
per-layer CKA), `humaneval` (canonical-solution NLL and execution pass@k of completions, run in sandboxed
subprocesses), `lm-eval` (lm-evaluation-harness tasks from local YAML and data). Students are evaluated
exactly as trained: the fake-quant model. A compressed-tensors export is evaluated as transformers serves it
(`export.reader.load_served`, bf16) unless `--runtime ckaqad` loads it back into ckaqad's student.
`--model default` measures
the embedded teacher against itself. Writes eval.json, eval.md and results.json atomically.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import HEADLINE, ROUTING_HEADLINE
from ckaqad.eval.gsm_sem.checks import LEVELS
from ckaqad.eval.gsm_sem.score import PROMPT_STYLES
from ckaqad.eval.suites import NEEDS_TEACHER, SUITES
from ckaqad.eval.tasks import task_metrics, task_table
from ckaqad.export.reader import inspect_export, load_served
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.models.load import LoadedModel, load_model, resolve_device
from ckaqad.paths import detect, run_teacher_spec
from ckaqad.report import tables
from ckaqad.report.gsm_sem import score_table
from ckaqad.report.results import ModelResult, ResultDir, flat_metrics, write_results
from ckaqad.students.spec import load_student
from ckaqad.students.store import check_vocabulary

HELP = "evaluate a model, run or export: fidelity to the teacher, HumanEval, lm-eval tasks"

PROMPT_CHOICES = ("auto", "completion", "instruct")
RUNTIMES = ("auto", "ckaqad", "transformers")
STUDENT_KINDS = ("export", "student", "run")  # `paths.detect` kinds loaded as students of a teacher


@dataclass
class Config:
    model: str = "default"
    """model to evaluate: default, a .gguf file, an HF directory, a run, student or export directory"""
    teacher: str | None = None
    """teacher for fidelity (default: the run's teacher, else the embedded model)"""
    runtime: str = "auto"
    """auto (an export as served, else ckaqad), ckaqad (the fake-quant student) or transformers (bf16, served)"""
    suite: str = "fidelity,humaneval"
    """comma-separated suites: fidelity, humaneval, lm-eval, tasks (0-shot ARC, PIQA, ... from local data), gsm-sem"""
    tasks: str | None = None
    """comma-separated task names of --suite lm-eval, or of --suite tasks (default: eval.tasks.DEFAULT_TASKS)"""
    include_path: str | None = None
    """directory of local lm-eval task YAML files"""
    limit: int | None = None
    """evaluate only the first N HumanEval problems / lm-eval documents / held-out blocks (tasks: a fixed random N)"""
    humaneval_max_tokens: int = 384
    """maximum generated tokens per HumanEval completion"""
    humaneval_prompt: str = "auto"
    """HumanEval prompt: completion (bare), instruct (lm-eval's humaneval_instruct) or auto (instruct if chat)"""
    humaneval_samples: int = 1
    """completions per problem (pass@k for k up to this; >1 samples at --temperature)"""
    temperature: float = 0.0
    """HumanEval sampling temperature (0: greedy)"""
    exec_timeout: float = 5.0
    """seconds each HumanEval program may run"""
    eval_blocks: int = 32
    """held-out blocks for fidelity"""
    batch_size: int = 8
    """batch size for every suite"""
    seed: int = 0
    """seed of the held-out blocks the runtime-spread suite samples"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/eval"
    """output directory (eval.json, eval.md)"""
    gsm_sem_variants: str | None = None
    """--suite gsm-sem: a `ckaqad gsm-sem generate` output directory, or the released GSM-SEM files"""
    gsm_sem_level: str = "min-med"
    """--suite gsm-sem: score variants at this strictness level or stricter (none ... max)"""
    gsm_sem_prompt: str = "8shot"
    """--suite gsm-sem: 8shot (standard GSM8K chain-of-thought exemplars) or chat (0-shot, chat template)"""
    gsm_sem_max_tokens: int = 256
    """--suite gsm-sem: maximum new tokens per answer"""

    def __post_init__(self) -> None:
        for suite in self.suites:
            SUITES.check(suite)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if "lm-eval" in self.suites and not self.tasks:
            raise ConfigError("--suite lm-eval needs --tasks (and usually --include-path for local tasks)")
        if "gsm-sem" in self.suites and not self.gsm_sem_variants:
            raise ConfigError("--suite gsm-sem needs --gsm-sem-variants (a gsm-sem generate directory or the "
                              "released files)")
        if self.gsm_sem_level not in LEVELS or self.gsm_sem_prompt not in PROMPT_STYLES or self.gsm_sem_max_tokens < 1:
            raise ConfigError(f"--gsm-sem-level must be one of {', '.join(LEVELS)}, --gsm-sem-prompt one of "
                              f"{', '.join(PROMPT_STYLES)}, --gsm-sem-max-tokens >= 1")
        if self.humaneval_samples < 1 or self.batch_size < 1 or self.eval_blocks < 1:
            raise ConfigError("--humaneval-samples, --batch-size and --eval-blocks must be at least 1")
        if self.humaneval_prompt not in PROMPT_CHOICES:
            raise ConfigError(f"--humaneval-prompt must be auto, completion or instruct, got {self.humaneval_prompt!r}")
        if self.humaneval_samples > 1 and self.temperature <= 0:
            raise ConfigError("--humaneval-samples > 1 needs --temperature > 0 (greedy samples are identical)")
        if self.runtime not in RUNTIMES:
            raise ConfigError(f"--runtime must be auto, ckaqad or transformers, got {self.runtime!r}")
        if self.runtime == "transformers" and detect(Path(self.model).expanduser()) != "export":
            raise ConfigError(f"--runtime transformers evaluates export directories only; {self.model} is not one")

    @property
    def resolved_runtime(self) -> str:
        return model_runtime(self.model, self.runtime)

    @property
    def suites(self) -> list[str]:
        return [s.strip() for s in self.suite.split(",") if s.strip()]

    @property
    def needs_teacher(self) -> bool:
        return any(s in NEEDS_TEACHER for s in self.suites)






def model_runtime(spec: str, runtime: str = "auto") -> str:
    """The runtime that measures model `spec` under `--runtime runtime`. `auto`: a compressed-tensors export as
    transformers serves it (the model users deploy;
    docs/serving.md#which-arithmetic-load_exportdir-and-ckaqad-eval---model-export-use-by-default); any other
    model, and a ModelOpt export (TensorRT-LLM's layout, which transformers does not load), as ckaqad's student."""
    if runtime != "auto":
        return runtime
    path = Path(spec).expanduser()
    served = detect(path) == "export" and inspect_export(path).layout.name == "compressed-tensors"
    return "transformers" if served else "ckaqad"


@dataclass
class EvalModel:
    """The model under evaluation, its tokenizer and label, and the teacher (None when no suite needs one)."""

    model: torch.nn.Module
    tokenizer: object
    label: str
    teacher: LoadedModel | None


def load_eval_model(spec: str, teacher_spec: str | None, device, need_teacher: bool,
                    runtime: str = "ckaqad") -> EvalModel:
    """Any model spec: a run, student or export directory is loaded as a student of its teacher (--teacher,
    else the run's, else the embedded model) with the teacher's tokenizer; `default`, a .gguf or an HF
    directory is loaded as a model with its own tokenizer (and is its own teacher when it is the default).
    With runtime `transformers` (exports only), the export is loaded as transformers serves it
    (`load_served`), with the export's tokenizer."""
    path = Path(spec).expanduser()
    if runtime == "transformers":
        teacher_spec = teacher_spec or run_teacher_spec(path) or "default"
        teacher = load_model(teacher_spec, device=device) if need_teacher else None
        served, tokenizer = load_served(path, device=resolve_device(device))
        if teacher is not None:
            check_vocabulary(served, teacher.model, spec)
        return EvalModel(served, tokenizer, f"export:{path.name} (transformers)", teacher)
    if detect(path) in STUDENT_KINDS:
        teacher = load_model(teacher_spec or run_teacher_spec(path) or "default", device=device)
        loaded = load_student(path, teacher.model)
        return EvalModel(loaded.model, teacher.tokenizer, loaded.label, teacher)
    model = load_model(spec, device=device)
    label = path.name if spec != "default" else "teacher"
    if not need_teacher:
        return EvalModel(model.model, model.tokenizer, label, None)
    if teacher_spec:
        teacher = load_model(teacher_spec, device=device)
    else:
        teacher = model if spec == "default" else load_model("default", device=device)
    check_vocabulary(model.model, teacher.model, spec)
    return EvalModel(model.model, model.tokenizer, label, teacher)


def gsm_sem_lines(result: dict) -> list[str]:
    """eval.md's GSM-SEM paragraph: the accuracy/drop table of every metrics group (per-item answers in eval.json)."""
    lines = [f"GSM-SEM (variants at level {result['level']} or stricter, {result['prompt']} prompt, greedy):", "",
             *(f"Warning: {line}" for line in result.get("warnings", [])), ""]
    for group in result["metrics"]:
        lines += [f"`{group}`:", "", *score_table({"model": result}, group), ""]
    return lines


def write_eval(out: Path, payload: dict) -> None:
    """eval.json (everything, per-problem HumanEval results included), eval.md and results.json."""
    d = ResultDir(out)
    write_json(d.eval_json, payload)
    lines = [f"# Evaluation: {payload['label']}", "",
             f"Model `{payload['model']}` (runtime {payload.get('runtime', 'ckaqad')}); "
             f"teacher `{payload.get('teacher')}`; device {payload['device']}; "
             f"{payload['runtime_s']:.0f} s.", "", *tables.metric_lines(flat_metrics(payload))]
    he = payload.get("humaneval")
    if he:
        failed = [p for p in he["per_problem"] if not p["correct"]]
        lines += ["", f"HumanEval ({he.get('prompt_style', 'completion')} prompt): {he['num_problems']} problems, "
                  f"pass@1 {he.get('pass@1', float('nan')):.3f}, "
                  f"canonical-solution NLL {he['nll_token_mean']:.4f} nats/token; "
                  f"{len(failed)} failed (reasons in eval.json)."]
    spread = payload.get("runtime_spread")
    if spread:
        lines += ["", *tables.spread_table(spread)]
    if payload.get("gsm_sem"):
        lines += ["", *gsm_sem_lines(payload["gsm_sem"])]
    if payload.get("tasks"):
        lines += ["", "Downstream tasks (0-shot, lm-eval scoring, `eval.tasks`):", "", *task_table(payload["tasks"])]
    write_text(d.eval_md, "\n".join(lines) + "\n")
    fid = payload.get("fidelity") or {}
    model = ModelResult(label=payload["label"], source=payload["model"],
                        fidelity={k: fid[k] for k in (*HEADLINE, *ROUTING_HEADLINE) if k in fid},
                        layers=list(fid.get("layers", [])),
                        humaneval={k: v for k, v in (he or {}).items() if k != "per_problem"},
                        lm_eval={**(payload.get("lm_eval") or {}), **task_metrics(payload.get("tasks") or {})})
    teacher = {"source": payload.get("teacher")}
    if "teacher_perplexity" in fid:
        teacher["perplexity"] = fid["teacher_perplexity"]
    meta = {"runtime": payload.get("runtime", "ckaqad"), "device": payload["device"],
            "runtime_s": payload["runtime_s"], "config": payload["config"],
            **({"token_rule": fid["token_rule"], "data": fid["data"]} if fid else {})}
    write_results(out, "eval", [model], teacher=teacher, meta=meta)


def run(config: Config) -> dict:
    """Evaluate --model with every suite; write --out atomically, print eval.md; return the eval.json payload."""
    out = check_writable(config.out)
    started = time.perf_counter()
    runtime = config.resolved_runtime
    target = load_eval_model(config.model, config.teacher, config.device, need_teacher=config.needs_teacher,
                             runtime=runtime)
    target.model.eval()
    payload: dict = {"model": config.model, "label": target.label,
                     "teacher": target.teacher.source if target.teacher else None,
                     "runtime": runtime, "device": str(next(target.model.parameters()).device),
                     "config": asdict(config)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(target.model.parameters()).is_cuda)
    with autocast:
        for name, suite in SUITES.items():  # registry order, whatever the order of --suite
            if name in config.suites:
                payload[name.replace("-", "_")] = suite(target.model, target.tokenizer, target.teacher, config)
    payload["runtime_s"] = time.perf_counter() - started
    with atomic_directory(out) as tmp:
        write_eval(tmp, payload)
    print(ResultDir(out).eval_md.read_text())
    return payload
