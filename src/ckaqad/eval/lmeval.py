"""lm-evaluation-harness on an already-loaded (in-memory) model, offline.

The model and tokenizer are wrapped in lm-eval's ``HFLM`` without touching the Hub; tasks come from
lm-eval's registry plus ``include_path`` (a directory of task YAMLs). A task can read local data with
``dataset_path: json`` and ``dataset_kwargs: {data_files: {test: /abs/path.jsonl}}``: the ``json``
builder ships with ``datasets`` and, with the offline switches set here, makes no network request.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ckaqad.errors import ConfigError, MissingDependencyError
from ckaqad.quant.apply import cached_quantized_weights
from ckaqad.registry import close_matches, unknown_name

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
_LIST_ALL_CHOICES_UP_TO = 50


def set_offline() -> None:
    """Switch the Hugging Face libraries to offline mode, also when they are already imported.

    ``datasets`` and ``huggingface_hub`` read the environment once, at import, so the flags of modules
    already in ``sys.modules`` are set as well. Without this, ``load_dataset("json", ...)`` still sends
    a HEAD request to count the download.
    """
    os.environ.update(OFFLINE_ENV)
    hub_constants = sys.modules.get("huggingface_hub.constants")
    if hub_constants is not None:
        hub_constants.HF_HUB_OFFLINE = True
    ds_config = sys.modules.get("datasets.config")
    if ds_config is not None:
        ds_config.HF_HUB_OFFLINE = True
        ds_config.HF_DATASETS_OFFLINE = True
        ds_config.HF_UPDATE_DOWNLOAD_COUNTS = False


def _unknown_task(name: str, known: Sequence[str]) -> ConfigError:
    if len(known) <= _LIST_ALL_CHOICES_UP_TO:
        return unknown_name("lm-eval task", name, known)
    return ConfigError(
        f"unknown lm-eval task {name!r}{close_matches(name, known)}; {len(known)} tasks, groups and tags "
        "are registered (`lm-eval ls tasks` lists them; add your own YAMLs with include_path)"
    )


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def compact_results(results: dict) -> dict[str, dict[str, float]]:
    """``{task: {metric: value}}`` from an lm-eval results dict.

    Only the numeric ``"<metric>,<filter>"`` entries of ``results["results"]`` are kept, the ``,none``
    filter suffix is removed (other filters keep theirs: ``"exact_match,strict-match"``) and stderr
    entries become ``<metric>_stderr``; non-numeric values (``"N/A"`` stderr) are dropped. ``"samples"``
    is the number of documents evaluated (``n-samples``' effective count), where lm-eval reports it.
    """
    n_samples = results.get("n-samples", {})
    compact: dict[str, dict[str, float]] = {}
    for task, metrics in results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if "," not in key or not _is_number(value):
                continue
            metric, _, filt = key.partition(",")
            row[metric if filt == "none" else key] = float(value)
        effective = n_samples.get(task, {}).get("effective") if isinstance(n_samples, dict) else None
        if _is_number(effective):
            row["samples"] = float(effective)
        compact[task] = row
    return compact


def run_lm_eval(
    model,
    tokenizer,
    tasks: list[str],
    include_path: str | None,
    limit: int | None = None,
    batch_size: int = 8,
    num_fewshot: int | None = None,
    device: str | None = None,
    include_defaults: bool = True,
    bootstrap_iters: int = 100000,
    samples: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate an in-memory HF causal LM on lm-eval ``tasks``; return ``{task: {metric: value}}``.

    ``include_path``: a directory (or YAML file) of extra task configs, or None. ``limit``: at most this
    many documents per task (>= 1; lm-eval's fractional limits are not accepted). ``device``: move the
    model there first (default: leave it where it is). ``include_defaults=False`` skips indexing
    lm-eval's ~15k built-in task configs (several seconds) when only ``include_path`` tasks are needed.
    Metric names lose the ``,none`` suffix; standard errors appear as ``<metric>_stderr``; ``samples``
    counts the documents evaluated (see :func:`compact_results`). ``samples``: ``{task: document indices}``
    to evaluate instead of the first ``limit`` (lm-eval's own option; not with ``limit``). The model's
    train/eval mode is restored.
    MissingDependencyError when lm-eval is not installed.
    """
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(f"tasks must be a non-empty list of task names, got {tasks!r}")
    if not all(isinstance(t, str) and t for t in tasks):
        raise ConfigError(f"task names must be non-empty strings, got {list(tasks)!r}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"lm-eval limit must be an integer >= 1, got {limit!r}")
    if samples is not None and limit is not None:
        raise ConfigError("give lm-eval either limit or samples, not both")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if num_fewshot is not None and (
        isinstance(num_fewshot, bool) or not isinstance(num_fewshot, int) or num_fewshot < 0
    ):
        raise ConfigError(f"num_fewshot must be an integer >= 0, got {num_fewshot!r}")
    if isinstance(bootstrap_iters, bool) or not isinstance(bootstrap_iters, int) or bootstrap_iters < 0:
        raise ConfigError(f"bootstrap_iters must be an integer >= 0, got {bootstrap_iters!r}")
    if include_path is not None and not Path(include_path).exists():
        raise ConfigError(f"lm-eval include_path {str(include_path)!r} does not exist")
    if include_path is None and not include_defaults:
        raise ConfigError("no lm-eval tasks to choose from: give include_path or keep include_defaults")

    set_offline()
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as exc:
        raise MissingDependencyError(f"lm-eval is not installed (pip install 'ckaqad[eval]'): {exc}") from exc
    set_offline()  # lm_eval imports datasets / huggingface_hub: make sure their flags are set

    task_manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
    )
    known = task_manager.all_tasks
    known_set = set(known)
    for name in tasks:
        if name not in known_set:
            raise _unknown_task(name, known)

    was_training = getattr(model, "training", False)
    if device is not None:
        model.to(device)
    try:
        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
        with cached_quantized_weights(model):  # a fake-quant student: quantize its weights once, not per batch
            results = lm_eval.simple_evaluate(
                model=lm,
                tasks=list(tasks),
                task_manager=task_manager,
                limit=limit,
                samples=samples,
                num_fewshot=num_fewshot,
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
            )
    finally:
        model.train(was_training)
    if results is None:  # only on non-zero ranks of a distributed run
        return {}
    return compact_results(results)
