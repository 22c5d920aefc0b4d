"""One results schema for every command that measures models (diagnose, eval, demo), read by `compare`.

`results.json` in a result directory::

    {"schema": "ckaqad.results/1",
     "kind": "diagnose" | "eval" | "demo",
     "teacher": {"source": str | null, "perplexity": float, "predicted_tokens": int} | {},
     "models": [{"label": str, "source": str | null,
                 "fidelity": {kl_per_token, perplexity, top1_agreement, mean_cka, min_cka, min_cka_layer,
                              mean_cka_debiased, predicted_tokens, cka_tokens, ...} | {},
                 "layers": [{"index", "teacher_index", "cka", "cka_debiased"}, ...],
                 "humaneval": {nll_token_mean, pass@1, ..., num_problems, prompt_style} | {},
                 "lm_eval": {task: {metric: value}} | {},
                 "training": {median_step_s, tokens_per_s, peak_memory_mb, final_loss} | {},
                 "quantization": {QuantReport fields or the student's meta} | {}}, ...],
     "meta": {...}}            # data, device, token_rule, runtime_s, config, (eval) runtime, ...

Each command also keeps its own documented files (diagnosis.json, eval.json, report.json); `read_results`
reads those too, for directories written before results.json existed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ckaqad.errors import CheckpointError
from ckaqad.eval.fidelity import COMPARED, HEADLINE, ROUTING_HEADLINE, Fidelity
from ckaqad.files import write_json

SCHEMA = "ckaqad.results/1"
KINDS = ("diagnose", "eval", "demo")


@dataclass(frozen=True)
class ResultDir:
    """The file names of a result directory (`ckaqad diagnose / eval / demo / compare --out`)."""

    root: Path
    RESULTS = "results.json"
    CKA_LAYERS = "cka_layers.png"

    @property
    def results(self) -> Path:
        return self.root / self.RESULTS

    @property
    def cka_layers(self) -> Path:
        return self.root / self.CKA_LAYERS

    # ckaqad diagnose
    @property
    def diagnosis_json(self) -> Path:
        return self.root / "diagnosis.json"

    @property
    def diagnosis_md(self) -> Path:
        return self.root / "diagnosis.md"

    @property
    def diagnosis_html(self) -> Path:
        return self.root / "diagnosis.html"

    # ckaqad eval
    @property
    def eval_json(self) -> Path:
        return self.root / "eval.json"

    @property
    def eval_md(self) -> Path:
        return self.root / "eval.md"

    # ckaqad demo
    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_html(self) -> Path:
        return self.root / "report.html"

    @property
    def loss_curves(self) -> Path:
        return self.root / "loss_curves.png"

    # ckaqad compare
    @property
    def compare_json(self) -> Path:
        return self.root / "compare.json"

    @property
    def compare_md(self) -> Path:
        return self.root / "compare.md"

    @property
    def compare_html(self) -> Path:
        return self.root / "compare.html"

    @property
    def metrics_png(self) -> Path:
        return self.root / "metrics.png"


@dataclass
class ModelResult:
    """One measured model of a results file."""

    label: str
    source: str | None = None
    fidelity: dict = field(default_factory=dict)
    layers: list[dict] = field(default_factory=list)
    humaneval: dict = field(default_factory=dict)
    lm_eval: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    quantization: dict = field(default_factory=dict)

    @classmethod
    def from_fidelity(cls, fidelity: Fidelity, **sections) -> ModelResult:
        """The entry of a model measured by `measure_fidelity` (its headline numbers and per-layer rows)."""
        return cls(label=fidelity.label, fidelity=fidelity.headline(), layers=list(fidelity.layers), **sections)

    def metrics(self) -> dict[str, float]:
        """The headline numbers, flattened for tables (see `flat_metrics`)."""
        return flat_metrics({"fidelity": self.fidelity, "humaneval": self.humaneval, "lm_eval": self.lm_eval})

    def layer_cka(self) -> dict[int, float]:
        """{student block: CKA to the teacher}."""
        return {int(row["index"]): row["cka"] for row in self.layers}


@dataclass
class Results:
    """The content of a results.json (or of an older result file read into the same shape)."""

    kind: str
    models: list[ModelResult]
    teacher: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "kind": self.kind, "teacher": self.teacher,
                "models": [asdict(m) for m in self.models], "meta": self.meta}

    @classmethod
    def from_dict(cls, data: dict, where: Path | str = "results.json") -> Results:
        if not isinstance(data, dict) or data.get("schema") != SCHEMA:
            found = data.get("schema") if isinstance(data, dict) else type(data).__name__
            raise CheckpointError(f"{where}: not a {SCHEMA} results file (schema {found!r})")
        if data.get("kind") not in KINDS:
            raise CheckpointError(f"{where}: unknown results kind {data.get('kind')!r}; expected one of {KINDS}")
        try:
            models = [ModelResult(**m) for m in data.get("models", [])]
        except TypeError as exc:
            raise CheckpointError(f"{where}: a model entry does not fit the {SCHEMA} schema: {exc}") from exc
        return cls(kind=data["kind"], models=models, teacher=data.get("teacher") or {}, meta=data.get("meta") or {})


def flat_metrics(payload: dict) -> dict[str, float]:
    """Headline numbers of an eval.json payload or a results.json model entry, flattened for tables:
    `fidelity.<COMPARED>` (and the routing drift of MoE models), `humaneval.{nll_token_mean, pass@1, pass@10}`,
    `lm-eval.<task>.<metric>` (no
    standard errors, no sample counts)."""
    out: dict[str, float] = {}
    fid = payload.get("fidelity") or {}
    for key in (*COMPARED, *ROUTING_HEADLINE):
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


def write_results(directory: Path, kind: str, models: list[ModelResult], teacher: dict | None = None,
                  meta: dict | None = None) -> Results:
    """Write `directory/results.json` (the directory must exist; callers write into a temp dir)."""
    if kind not in KINDS:
        raise ValueError(f"results kind must be one of {KINDS}, got {kind!r}")
    results = Results(kind=kind, models=list(models), teacher=dict(teacher or {}), meta=dict(meta or {}))
    write_json(ResultDir(Path(directory)).results, results.to_dict())
    return results


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}") from exc


def _headline(entry: dict) -> dict:
    return {k: entry[k] for k in (*HEADLINE, *ROUTING_HEADLINE) if k in entry}


def _from_eval_json(p: dict) -> Results:
    fid = p.get("fidelity") or {}
    he = {k: v for k, v in (p.get("humaneval") or {}).items() if k != "per_problem"}
    model = ModelResult(label=p["label"], source=p.get("model"), fidelity=_headline(fid),
                        layers=list(fid.get("layers", [])), humaneval=he, lm_eval=p.get("lm_eval") or {})
    teacher = {"source": p.get("teacher")}
    if "teacher_perplexity" in fid:
        teacher["perplexity"] = fid["teacher_perplexity"]
    return Results(kind="eval", models=[model], teacher=teacher,
                   meta={k: p[k] for k in ("device", "runtime_s", "config") if k in p})


def _from_diagnosis_json(p: dict) -> Results:
    quantization = p.get("quantization") or {}
    models = [ModelResult(label=v["label"], fidelity=_headline(v), layers=list(v.get("layers", [])),
                          quantization=quantization.get(v["label"], {})) for v in p["variants"]]
    meta = {k: v for k, v in p.items() if k not in ("teacher", "variants", "quantization")}
    return Results(kind="diagnose", models=models, teacher=p.get("teacher") or {}, meta=meta)


def _from_report_json(p: dict) -> Results:
    training = p.get("training") or {}
    models = [ModelResult(label=label, fidelity=_headline(v), layers=list(v.get("layers", [])),
                          training=training.get(label, {})) for label, v in p["models"].items()]
    meta = {k: v for k, v in p.items() if k not in ("teacher", "models", "training")}
    return Results(kind="demo", models=models, teacher=p.get("teacher") or {}, meta=meta)


def read_results(directory: str | Path) -> Results:
    """The results of a diagnose, eval or demo directory: its results.json, else (a directory written by an
    older version) its eval.json, diagnosis.json or report.json read into the same shape."""
    d = ResultDir(Path(directory).expanduser())
    if d.results.is_file():
        return Results.from_dict(_read_json(d.results), d.results)
    legacy = ((d.eval_json, _from_eval_json), (d.diagnosis_json, _from_diagnosis_json),
              (d.report_json, _from_report_json))
    for path, convert in legacy:
        if path.is_file():
            try:
                return convert(_read_json(path))
            except (KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{path} does not look like a ckaqad result file: {exc!r}") from exc
    raise CheckpointError(f"{d.root} has no results.json, eval.json, diagnosis.json or report.json to compare")
