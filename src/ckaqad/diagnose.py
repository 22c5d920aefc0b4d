"""Layerwise diagnosis: where a student's hidden states drift from the teacher's, and what it costs.

One pass over held-out blocks runs the teacher once and every student on the same batch, and accumulates:
per-layer linear CKA (biased, exact over all tokens; debiased, Nguyen et al. minibatch estimator) on the
residual-stream output of each decoder block with sinks and padding excluded, KL(teacher ‖ student) per
token, perplexities and top-1 agreement (METHOD.md §6).
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.capture import LayerCapture, valid_token_mask
from ckaqad.cka import CKAAccumulator
from ckaqad.errors import ConfigError
from ckaqad.losses import chunked_kl, next_token_nll
from ckaqad.models import num_layers


@dataclass
class Fidelity:
    """How close one student is to the teacher on the held-out tokens."""

    label: str
    layers: list[dict] = field(default_factory=list)  # {index, cka, cka_debiased}
    mean_cka: float = float("nan")
    min_cka: float = float("nan")
    min_cka_layer: int = -1
    mean_cka_debiased: float = float("nan")
    kl_per_token: float = float("nan")
    perplexity: float = float("nan")
    top1_agreement: float = float("nan")
    predicted_tokens: int = 0
    cka_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class _StudentStats:
    def __init__(self, layers: list[int]) -> None:
        self.cka = {i: CKAAccumulator() for i in layers}
        self.kl_sum = 0.0
        self.kl_tokens = 0
        self.nll_sum = 0.0
        self.nll_tokens = 0
        self.agree = 0

    def result(self, label: str) -> Fidelity:
        layers = [{"index": i, "cka": acc.biased(), "cka_debiased": acc.debiased()} for i, acc in self.cka.items()]
        values = [row["cka"] for row in layers]
        worst = min(range(len(values)), key=values.__getitem__) if values else -1
        return Fidelity(
            label=label, layers=layers,
            mean_cka=sum(values) / len(values) if values else float("nan"),
            min_cka=values[worst] if values else float("nan"),
            min_cka_layer=layers[worst]["index"] if values else -1,
            mean_cka_debiased=sum(r["cka_debiased"] for r in layers) / max(len(layers), 1),
            kl_per_token=self.kl_sum / max(self.kl_tokens, 1),
            perplexity=math.exp(self.nll_sum / max(self.nll_tokens, 1)),
            top1_agreement=self.agree / max(self.kl_tokens, 1),
            predicted_tokens=self.nll_tokens,
            cka_tokens=next(iter(self.cka.values())).n if self.cka else 0,
        )


@torch.no_grad()
def measure_fidelity(teacher: nn.Module, students: dict[str, nn.Module], batches, layers: list[int] | None = None,
                     n_sink: int = 1, exclude_token_ids: tuple[int, ...] = (), progress: bool = True,
                     total: int | None = None) -> tuple[dict[str, Fidelity], dict]:
    """Fidelity of each student to `teacher` over `batches` (model kwargs on the models' device).

    Returns ({label: Fidelity}, teacher stats {perplexity, predicted_tokens}). CKA uses every valid token
    (not a sample): position < n_sink, padding and `exclude_token_ids` are left out.
    """
    from tqdm.auto import tqdm

    layers = list(range(num_layers(teacher))) if layers is None else layers
    stats = {label: _StudentStats(layers) for label, _ in students.items()}
    teacher_nll, teacher_tokens = 0.0, 0
    captures = {label: LayerCapture(model, layers, detach=True) for label, model in students.items()}
    teacher_capture = LayerCapture(teacher, layers, detach=True)
    try:
        for batch in tqdm(batches, total=total, desc="diagnose", disable=not progress, unit="batch"):
            mask = valid_token_mask(batch["input_ids"], batch.get("attention_mask"), n_sink, exclude_token_ids)
            rows = mask.flatten().nonzero().squeeze(1)
            # Every capture gets this batch's rows before any forward: a student that is the teacher object
            # itself (`ckaqad eval --model default`) has both hooks fire in the teacher's forward.
            for capture in (teacher_capture, *captures.values()):
                capture.rows = rows
            t_logits = teacher(**batch).logits
            nll, count = next_token_nll(t_logits, batch["input_ids"], batch.get("attention_mask"))
            teacher_nll += float(nll)
            teacher_tokens += count
            real = batch.get("attention_mask", torch.ones_like(batch["input_ids"])).bool()
            t_top1 = t_logits.argmax(-1)
            for label, model in students.items():
                capture, st = captures[label], stats[label]
                s_logits = model(**batch).logits
                n_real = int(real.sum())
                st.kl_sum += float(chunked_kl(s_logits, t_logits, real)) * n_real
                st.kl_tokens += n_real
                nll, count = next_token_nll(s_logits, batch["input_ids"], batch.get("attention_mask"))
                st.nll_sum += float(nll)
                st.nll_tokens += count
                st.agree += int(((s_logits.argmax(-1) == t_top1) & real).sum())
                for i in layers:
                    st.cka[i].update(capture.states[i], teacher_capture.states[i])
                capture.clear()
            teacher_capture.clear()
    finally:
        teacher_capture.remove()
        for capture in captures.values():
            capture.remove()
    results = {label: st.result(label) for label, st in stats.items()}
    teacher_stats = {"perplexity": math.exp(teacher_nll / max(teacher_tokens, 1)), "predicted_tokens": teacher_tokens}
    return results, teacher_stats


def parse_layers(spec: str, n_layers: int) -> list[int]:
    """`all` or a comma list of indices / ranges (`0,4,8-11`), checked against the model's depth."""
    if spec in ("all", ""):
        return list(range(n_layers))
    layers: list[int] = []
    for part in spec.split(","):
        try:
            if "-" in part.strip()[1:]:
                lo, hi = (int(v) for v in part.split("-", 1))
                if hi < lo:  # an empty range would silently select no layer
                    raise ConfigError(f"--layers {spec!r}: range {part.strip()} runs backwards")
                layers.extend(range(lo, hi + 1))
            else:
                layers.append(int(part))
        except ValueError as exc:
            raise ConfigError(f"--layers must be 'all' or a list like 0,4,8-11, got {spec!r}") from exc
    layers = [i + n_layers if i < 0 else i for i in layers]
    bad = [i for i in layers if not 0 <= i < n_layers]
    if bad:
        raise ConfigError(f"--layers {spec!r}: layer index out of range for a model with {n_layers} layers")
    return sorted(set(layers))


# ---------------------------------------------------------------------------------------------- outputs


def plot_cka_layers(curves: dict[str, list[tuple[int, float]]], path: Path, title: str) -> None:
    """One line per variant: layer index vs CKA to the teacher."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        ax.plot(xs, ys, marker="o", markersize=3, label=label)
    ax.axhline(1.0, color="grey", linewidth=0.8, linestyle="--", label="teacher (CKA = 1)")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("linear CKA to teacher (sinks excluded)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def fidelity_table(results: dict[str, Fidelity], teacher_ppl: float) -> list[str]:
    lines = ["| model | mean CKA | min CKA (layer) | debiased mean CKA | KL/token | ppl | top-1 agree |",
             "|---|---|---|---|---|---|---|",
             f"| teacher | 1 | 1 | 1 | 0 | {teacher_ppl:.3f} | 1 |"]
    for r in results.values():
        lines.append(f"| {r.label} | {r.mean_cka:.4f} | {r.min_cka:.4f} ({r.min_cka_layer}) | "
                     f"{r.mean_cka_debiased:.4f} | {r.kl_per_token:.4f} | {r.perplexity:.3f} | "
                     f"{r.top1_agreement:.3f} |")
    return lines


def layer_table(results: dict[str, Fidelity]) -> list[str]:
    labels = list(results)
    lines = ["| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for i, row in enumerate(next(iter(results.values())).layers):
        lines.append(f"| {row['index']} | " + " | ".join(f"{results[lb].layers[i]['cka']:.4f}" for lb in labels)
                     + " |")
    return lines


def coverage_lines(quantization: dict[str, dict]) -> list[str]:
    """One line per student: how many Linear layers were quantized, and why the others were not.

    A format whose block does not divide the model's widths (INT4's 128 on a 576-wide model) quantizes
    only a few layers, and its fidelity numbers mean little without this line.
    """
    lines = []
    for label, q in quantization.items():
        reasons = Counter(q.get("excluded", {}).values())
        kept = "; ".join(f"{n} × {why}" for why, n in reasons.most_common())
        share = q.get("quantized_params", 0) / max(q.get("total_linear_params", 0), 1)
        lines.append(f"- {label}: {len(q.get('quantized', []))} Linear layers quantized ({share:.0%} of Linear "
                     f"parameters); kept in high precision: {kept or 'none'}")
    return lines


def write_diagnosis(out: Path, results: dict[str, Fidelity], teacher_stats: dict, meta: dict) -> None:
    # meta["teacher"] (the source string) must not overwrite the teacher's stats.
    payload = {"teacher": {"source": meta.get("teacher"), **teacher_stats},
               "variants": [r.to_dict() for r in results.values()],
               **{k: v for k, v in meta.items() if k != "teacher"}}
    (out / "diagnosis.json").write_text(json.dumps(payload, indent=2))
    plot_cka_layers({r.label: [(row["index"], row["cka"]) for row in r.layers] for r in results.values()},
                    out / "cka_layers.png", f"Layerwise CKA to the teacher ({meta.get('teacher')})")
    md = [f"# Diagnosis: {meta.get('teacher')}", "",
          f"Data: {meta.get('data')}. Tokens for CKA: {meta.get('cka_tokens')} "
          f"({meta.get('token_rule')}).", "", *fidelity_table(results, teacher_stats["perplexity"]), "",
          "Quantized layers:", "", *coverage_lines(meta.get("quantization", {})), "",
          "![per-layer CKA](cka_layers.png)", "", "## Per-layer CKA (biased, all held-out tokens)", "",
          *layer_table(results), "", f"Run time: {meta.get('runtime_s', 0):.1f} s on {meta.get('device')}.", ""]
    (out / "diagnosis.md").write_text("\n".join(md))


def print_summary(results: dict[str, Fidelity], teacher_ppl: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    layers = Table(title="Per-layer CKA to the teacher (sinks excluded)")
    layers.add_column("layer", justify="right")
    for label in results:
        layers.add_column(label, justify="right")
    for i, row in enumerate(next(iter(results.values())).layers):
        layers.add_row(str(row["index"]), *(f"{r.layers[i]['cka']:.4f}" for r in results.values()))
    console.print(layers)
    summary = Table(title="Fidelity to the teacher (held out)")
    for col in ("model", "mean CKA", "min CKA", "KL/token", "ppl", "top-1 agree"):
        summary.add_column(col, justify="right")
    summary.add_row("teacher", "1", "1", "0", f"{teacher_ppl:.3f}", "1")
    for r in results.values():
        summary.add_row(r.label, f"{r.mean_cka:.4f}", f"{r.min_cka:.4f} ({r.min_cka_layer})",
                        f"{r.kl_per_token:.4f}", f"{r.perplexity:.3f}", f"{r.top1_agreement:.3f}")
    console.print(summary)


def now() -> float:
    return time.perf_counter()


@dataclass
class DiagnoseConfig:
    teacher: str = "default"
    """teacher: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
    student: str | None = None
    """a trained run or export directory to diagnose instead of building PTQ students"""
    format: str = "nvfp4"
    """comma-separated formats of PTQ students (nvfp4, mxfp4, int4)"""
    scheme: str = "w4a4"
    """comma-separated schemes of PTQ students (w4a4, w4a16)"""
    eval_blocks: int = 32
    """held-out blocks evaluated"""
    batch_size: int = 4
    """blocks per forward pass"""
    n_sink: int = 1
    """leading positions of each sequence excluded from CKA (attention sinks)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    seed: int = 0
    """random seed"""
    out: str = "runs/diagnose"
    """output directory"""

    def __post_init__(self) -> None:
        from ckaqad.quantize import QuantConfig

        for fmt in self.formats:
            for scheme in self.schemes:
                QuantConfig(format=fmt, scheme=scheme)  # validates both names
        if self.eval_blocks < 1 or self.batch_size < 1:
            raise ConfigError("--eval-blocks and --batch-size must be at least 1")
        if self.n_sink < 0:
            raise ConfigError(f"--n-sink must be >= 0, got {self.n_sink}")

    @property
    def formats(self) -> list[str]:
        return [f.strip() for f in self.format.split(",") if f.strip()]

    @property
    def schemes(self) -> list[str]:
        return [s.strip() for s in self.scheme.split(",") if s.strip()]


def token_rule(n_sink: int) -> str:
    return (f"every held-out token except the first {n_sink} position(s) of each sequence (attention sinks), "
            "BOS and padding")


def build_ptq_students(teacher: nn.Module, formats: list[str], schemes: list[str], quant_fields: dict,
                       calib_blocks: torch.Tensor, batch_size: int, device) -> dict[str, tuple[nn.Module, object]]:
    """{label: (calibrated student, QuantReport)} for every format × scheme."""
    from ckaqad.data import eval_batches
    from ckaqad.quantize import QuantConfig, build_student, calibrate

    students = {}
    for fmt in formats:
        for scheme in schemes:
            config = QuantConfig(format=fmt, scheme=scheme, **quant_fields)
            student, report = build_student(teacher, config)
            calibrate(student, eval_batches(calib_blocks, batch_size, device, limit=config.calib_batches * batch_size))
            student.requires_grad_(False)
            students[f"{fmt}-{scheme}"] = (student, report)
    return students


def run_diagnose(config: DiagnoseConfig, data_config, quant_fields: dict, progress: bool = True) -> dict:
    """The `ckaqad diagnose` job. Validates everything before writing; writes DIR atomically."""
    from ckaqad.data import eval_batches, load_blocks
    from ckaqad.files import atomic_directory, check_writable
    from ckaqad.models import load_model
    from ckaqad.students import load_student

    out = check_writable(config.out)
    start = now()
    torch.manual_seed(config.seed)
    loaded = load_model(config.teacher, device=config.device)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    device = next(teacher.parameters()).device
    blocks = load_blocks(data_config, teacher, tokenizer)
    reports = {}
    if config.student:
        student, label, info = load_student(config.student, teacher)
        students = {label: student}
        reports[label] = info
    else:
        built = build_ptq_students(teacher, config.formats, config.schemes, quant_fields, blocks.train,
                                   config.batch_size, device)
        students = {label: s for label, (s, _) in built.items()}
        reports = {label: r.to_dict() for label, (_, r) in built.items()}
        for _, report in built.values():
            print(report.summary())
    n_eval = min(config.eval_blocks, blocks.heldout.shape[0])
    exclude = tuple(i for i in (tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        results, teacher_stats = measure_fidelity(
            teacher, students, eval_batches(blocks.heldout, config.batch_size, device, limit=n_eval),
            n_sink=config.n_sink, exclude_token_ids=exclude, progress=progress,
            total=math.ceil(n_eval / config.batch_size))
    runtime = now() - start
    meta = {"teacher": config.teacher, "data": blocks.describe(), "device": str(device),
            "cka_tokens": next(iter(results.values())).cka_tokens, "token_rule": token_rule(config.n_sink),
            "eval_blocks": n_eval, "seq_len": data_config.seq_len, "runtime_s": runtime,
            "quantization": reports, "config": {**asdict(config), **asdict(data_config), **quant_fields}}
    with atomic_directory(out) as tmp:
        write_diagnosis(tmp, results, teacher_stats, meta)
    if progress:
        print_summary(results, teacher_stats["perplexity"])
        print(f"wrote {out}/diagnosis.json, diagnosis.md, cka_layers.png ({runtime:.1f} s)")
    return {"results": results, "teacher": teacher_stats, "meta": meta}
