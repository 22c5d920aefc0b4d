"""`ckaqad eval` and `ckaqad compare`: measure any teacher, PTQ student, trained run or export the same way,
offline, and put several side by side.

Suites (registry `SUITES`): `fidelity` (needs the teacher: held-out KL, perplexity, top-1 agreement,
per-layer CKA), `humaneval` (canonical-solution NLL and execution pass@1 of greedy completions, run in
sandboxed subprocesses), `lm-eval` (lm-evaluation-harness tasks from local YAML and data).
Students are evaluated exactly as trained: the fake-quant model (an export is loaded back into one).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ckaqad.errors import ConfigError, unknown_name

SUITES = ("fidelity", "humaneval", "lm-eval")


@dataclass
class EvalConfig:
    model: str = "default"
    """model to evaluate: default, a .gguf file, an HF directory, a run, student or export directory"""
    teacher: str | None = None
    """teacher for fidelity (default: the run's teacher, else the embedded model)"""
    suite: str = "fidelity,humaneval"
    """comma-separated suites: fidelity, humaneval, lm-eval"""
    tasks: str | None = None
    """comma-separated lm-eval task names (with --suite lm-eval)"""
    include_path: str | None = None
    """directory of local lm-eval task YAML files"""
    limit: int | None = None
    """evaluate only the first N HumanEval problems / lm-eval documents / held-out blocks"""
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
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    out: str = "runs/eval"
    """output directory (eval.json, eval.md)"""

    def __post_init__(self) -> None:
        for suite in self.suites:
            if suite not in SUITES:
                raise unknown_name("suite (--suite)", suite, SUITES)
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit must be at least 1, got {self.limit}")
        if "lm-eval" in self.suites and not self.tasks:
            raise ConfigError("--suite lm-eval needs --tasks (and usually --include-path for local tasks)")
        if self.humaneval_samples < 1 or self.batch_size < 1 or self.eval_blocks < 1:
            raise ConfigError("--humaneval-samples, --batch-size and --eval-blocks must be at least 1")
        if self.humaneval_prompt not in ("auto", "completion", "instruct"):
            raise ConfigError(f"--humaneval-prompt must be auto, completion or instruct, got {self.humaneval_prompt!r}")
        if self.humaneval_samples > 1 and self.temperature <= 0:
            raise ConfigError("--humaneval-samples > 1 needs --temperature > 0 (greedy samples are identical)")

    @property
    def suites(self) -> list[str]:
        return [s.strip() for s in self.suite.split(",") if s.strip()]


def run_teacher_spec(path: Path) -> str | None:
    """The teacher a run directory was trained against (from its config.yaml), if `path` is a run."""
    import yaml

    for candidate in (path / "config.yaml", path.parent / "config.yaml", path.parent.parent.parent / "config.yaml"):
        if candidate.is_file():
            return (yaml.safe_load(candidate.read_text()) or {}).get("teacher")
    return None


def load_eval_model(spec: str, teacher_spec: str | None, device, need_teacher: bool):
    """(model, tokenizer, label, teacher LoadedModel or None) for any model spec."""
    from ckaqad import export
    from ckaqad.models import load_model
    from ckaqad.students import find_student_dir, load_student

    path = Path(spec).expanduser()
    is_student = path.is_dir() and (export.is_export_dir(path) or find_student_dir(path) is not None)
    if not is_student:
        loaded = load_model(spec, device=device)
        teacher = load_model(teacher_spec, device=device) if need_teacher and teacher_spec else None
        if need_teacher and teacher is None:
            teacher = load_model("default", device=device) if spec != "default" else loaded
        return loaded.model, loaded.tokenizer, Path(spec).name if spec != "default" else "teacher", teacher
    teacher = load_model(teacher_spec or run_teacher_spec(path) or "default", device=device)
    model, label, _ = load_student(path, teacher.model)
    tokenizer = teacher.tokenizer
    if export.is_export_dir(path):
        label = f"export:{path.name}"
    return model, tokenizer, label, teacher


def fidelity_suite(model, teacher, config: EvalConfig, seq_len: int = 256) -> dict:
    from ckaqad.data import DataConfig, eval_batches, load_blocks
    from ckaqad.diagnose import measure_fidelity, token_rule

    blocks = load_blocks(DataConfig(seq_len=seq_len), teacher.model, teacher.tokenizer)
    device = next(teacher.model.parameters()).device
    n = min(config.limit or config.eval_blocks, config.eval_blocks, blocks.heldout.shape[0])
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        batches = eval_batches(blocks.heldout, config.batch_size, device, limit=n)
        results, t = measure_fidelity(teacher.model, {"model": model}, batches, exclude_token_ids=exclude,
                                      total=math.ceil(n / config.batch_size))
    r = results["model"]
    return {"kl_per_token": r.kl_per_token, "perplexity": r.perplexity, "teacher_perplexity": t["perplexity"],
            "top1_agreement": r.top1_agreement, "mean_cka": r.mean_cka, "min_cka": r.min_cka,
            "min_cka_layer": r.min_cka_layer, "mean_cka_debiased": r.mean_cka_debiased, "layers": r.layers,
            "tokens": r.predicted_tokens, "cka_tokens": r.cka_tokens, "token_rule": token_rule(1),
            "data": blocks.describe()}


def humaneval_suite(model, tokenizer, config: EvalConfig) -> dict:
    from ckaqad import humaneval

    style = humaneval.resolve_prompt_style(config.humaneval_prompt, tokenizer)
    problems = humaneval.load_problems(config.limit)
    nll_rows = humaneval.canonical_nll(model, tokenizer, problems, batch_size=config.batch_size)
    completions = humaneval.generate_completions(model, tokenizer, problems, max_new_tokens=config.humaneval_max_tokens,
                                                 batch_size=config.batch_size, num_samples=config.humaneval_samples,
                                                 temperature=config.temperature, prompt_style=style)
    ks = [k for k in (1, 10, 100) if k <= config.humaneval_samples]
    execution = humaneval.evaluate_execution(problems, completions, k=ks, timeout=config.exec_timeout)
    by_id = {row["task_id"]: row for row in nll_rows}
    for entry in execution["per_problem"]:
        entry["nll"] = by_id[entry["task_id"]]["nll"]
        entry["completion"] = next(c["completion"] for c in completions if c["task_id"] == entry["task_id"])
    return {**humaneval.summarize_nll(nll_rows), **{k: v for k, v in execution.items() if k != "per_problem"},
            "prompt_style": style, "per_problem": execution["per_problem"]}


def lm_eval_suite(model, tokenizer, config: EvalConfig) -> dict:
    from ckaqad.lmeval import run_lm_eval

    tasks = [t.strip() for t in (config.tasks or "").split(",") if t.strip()]
    return run_lm_eval(model, tokenizer, tasks, config.include_path, limit=config.limit, batch_size=config.batch_size)


def flat_metrics(payload: dict) -> dict[str, float]:
    """Headline numbers of an eval.json / diagnosis.json / report.json, flattened for tables."""
    out: dict[str, float] = {}
    fid = payload.get("fidelity") or {}
    for key in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka", "min_cka"):
        if key in fid:
            out[f"fidelity.{key}"] = fid[key]
    he = payload.get("humaneval") or {}
    for key in ("nll_token_mean", "pass@1", "pass@10"):
        if key in he:
            out[f"humaneval.{key}"] = he[key]
    for task, metrics in (payload.get("lm_eval") or {}).items():
        for metric, value in metrics.items():
            if not metric.endswith("_stderr") and metric != "samples":
                out[f"lm-eval.{task}.{metric}"] = value
    return out


def write_eval(out: Path, payload: dict) -> None:
    (out / "eval.json").write_text(json.dumps(payload, indent=2, default=str))
    lines = [f"# Evaluation: {payload['label']}", "",
             f"Model `{payload['model']}`; teacher `{payload.get('teacher')}`; device {payload['device']}; "
             f"{payload['runtime_s']:.0f} s.", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
              for k, v in flat_metrics(payload).items()]
    he = payload.get("humaneval")
    if he:
        failed = [p for p in he["per_problem"] if not p["correct"]]
        lines += ["", f"HumanEval ({he.get('prompt_style', 'completion')} prompt): {he['num_problems']} problems, "
                  f"pass@1 {he.get('pass@1', float('nan')):.3f}, "
                  f"canonical-solution NLL {he['nll_token_mean']:.4f} nats/token; "
                  f"{len(failed)} failed (reasons in eval.json)."]
    (out / "eval.md").write_text("\n".join(lines) + "\n")


def run_eval(config: EvalConfig) -> dict:
    from ckaqad.files import atomic_directory, check_writable

    out = check_writable(config.out)
    started = time.perf_counter()
    model, tokenizer, label, teacher = load_eval_model(config.model, config.teacher, config.device,
                                                       need_teacher="fidelity" in config.suites)
    model.eval()
    payload: dict = {"model": config.model, "label": label, "teacher": teacher.source if teacher else None,
                     "device": str(next(model.parameters()).device), "config": asdict(config)}
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=next(model.parameters()).is_cuda)
    with autocast:
        if "fidelity" in config.suites:
            payload["fidelity"] = fidelity_suite(model, teacher, config)
        if "humaneval" in config.suites:
            payload["humaneval"] = humaneval_suite(model, tokenizer, config)
        if "lm-eval" in config.suites:
            payload["lm_eval"] = lm_eval_suite(model, tokenizer, config)
    payload["runtime_s"] = time.perf_counter() - started
    with atomic_directory(out) as tmp:
        write_eval(tmp, payload)
    print((out / "eval.md").read_text())
    return payload


# ---------------------------------------------------------------------------------------------- compare


@dataclass
class CompareConfig:
    out: str = "runs/compare"
    """output directory (compare.md, compare.html, plots)"""


def read_result(path: Path) -> list[tuple[str, dict, dict]]:
    """[(label, metrics, layers {index: cka})] from an eval, diagnosis or demo-report directory."""
    from ckaqad.errors import CheckpointError

    if (path / "eval.json").is_file():
        p = json.loads((path / "eval.json").read_text())
        layers = {r["index"]: r["cka"] for r in (p.get("fidelity") or {}).get("layers", [])}
        return [(p["label"], flat_metrics(p), layers)]
    if (path / "diagnosis.json").is_file():
        p = json.loads((path / "diagnosis.json").read_text())
        return [(v["label"], {f"fidelity.{k}": v[k] for k in ("kl_per_token", "perplexity", "top1_agreement",
                                                                "mean_cka", "min_cka")},
                 {r["index"]: r["cka"] for r in v["layers"]}) for v in p["variants"]]
    if (path / "report.json").is_file():
        p = json.loads((path / "report.json").read_text())
        return [(label, {f"fidelity.{k}": v[k] for k in ("kl_per_token", "perplexity", "top1_agreement", "mean_cka",
                                                         "min_cka")}, {r["index"]: r["cka"] for r in v["layers"]})
                for label, v in p["models"].items()]
    raise CheckpointError(f"{path} has no eval.json, diagnosis.json or report.json to compare")


def run_compare(dirs: list[str], config: CompareConfig) -> dict:
    import markdown
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ckaqad.diagnose import plot_cka_layers
    from ckaqad.files import atomic_directory, check_writable

    if len(dirs) < 1:
        raise ConfigError("compare needs at least one result directory")
    out = check_writable(config.out)
    rows = []
    for d in dirs:
        for label, metrics, layers in read_result(Path(d)):
            rows.append((f"{label} ({Path(d).name})", metrics, layers))
    columns = sorted({k for _, m, _ in rows for k in m})
    table = ["| model | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for label, metrics, _ in rows:
        cells = [f"{metrics[c]:.4f}" if isinstance(metrics.get(c), float) else str(metrics.get(c, "–"))
                 for c in columns]
        table.append(f"| {label} | " + " | ".join(cells) + " |")
    with atomic_directory(out) as tmp:
        curves = {label: sorted(layers.items()) for label, _, layers in rows if layers}
        if curves:
            plot_cka_layers(curves, tmp / "cka_layers.png", "Per-layer CKA to the teacher")
        fig, axes = plt.subplots(1, max(len(columns), 1), figsize=(3.2 * max(len(columns), 1), 3.4), squeeze=False)
        for ax, column in zip(axes[0], columns, strict=False):
            values = [m.get(column, float("nan")) for _, m, _ in rows]
            ax.bar(range(len(rows)), values, color=[f"C{i}" for i in range(len(rows))])
            ax.set_xticks(range(len(rows)), [r[0] for r in rows], rotation=60, ha="right", fontsize=6)
            ax.set_title(column, fontsize=8)
        fig.tight_layout()
        fig.savefig(tmp / "metrics.png", dpi=110)
        plt.close(fig)
        text = "\n".join(["# Comparison", "", *table, "", "![per-layer CKA](cka_layers.png)" if curves else "",
                          "", "![metrics](metrics.png)", "", "Sources: " + ", ".join(f"`{d}`" for d in dirs), ""])
        (tmp / "compare.md").write_text(text)
        (tmp / "compare.html").write_text("<!doctype html><meta charset='utf-8'><title>ckaqad compare</title>"
                                          + markdown.markdown(text, extensions=["tables"]))
        (tmp / "compare.json").write_text(json.dumps({label: m for label, m, _ in rows}, indent=2))
    print("\n".join(table))
    return {label: m for label, m, _ in rows}


def cli_commands() -> dict:
    def _eval(values: dict) -> int:
        from ckaqad.cli import build_config

        run_eval(build_config(EvalConfig, values))
        return 0

    def _compare(values: dict) -> int:
        from ckaqad.cli import build_config

        run_compare(list(values.pop("dirs")), build_config(CompareConfig, values))
        return 0

    return {
        "eval": ("evaluate a model, run or export: fidelity to the teacher, HumanEval, lm-eval tasks",
                 [(EvalConfig, ())], _eval),
        "compare": ("one table and plots from several eval / diagnose / demo directories",
                    [(CompareConfig, ())], _compare, "dirs"),
    }
