"""`ckaqad diagnose`: layerwise CKA, KL and perplexity of PTQ students (every --format × --scheme) or of one
trained student (--student: a run, student, export or HF model directory) against the teacher, on the same
held-out tokens. Writes diagnosis.json, diagnosis.md, diagnosis.html, cka_layers.png and results.json
atomically; nothing is written before every input has been checked.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import (
    MASSIVE_DOMINANT_SHARE,
    MASSIVE_SUGGESTED_FACTOR,
    MASSIVE_TOP_FRACTION,
    Fidelity,
    measure_fidelity,
    token_rule,
)
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.models.arch import block_kind, decoder_layers
from ckaqad.models.load import load_model
from ckaqad.quant.linear import DEFAULT_EXCLUDE, QuantConfig
from ckaqad.report import html, plots, tables
from ckaqad.report.results import ModelResult, ResultDir, write_results
from ckaqad.students.spec import build_ptq_student, load_student

HELP = "layerwise CKA, KL and perplexity of NVFP4 (or other) students against the teacher"


@dataclass
class PTQOptions:
    """QuantConfig's fields but format and scheme (those are comma lists of `ckaqad diagnose`)."""

    exclude: tuple[str, ...] = DEFAULT_EXCLUDE
    """fnmatch patterns of module names kept in high precision"""
    calib_batches: int = QuantConfig.calib_batches
    """batches of max-calibration for activation global scales"""
    calib_batch_size: int = QuantConfig.calib_batch_size
    """training blocks per calibration batch (calibration sees the first calib_batches x this many)"""
    weight_global: str = QuantConfig.weight_global
    """weight global scale: dynamic (recomputed each forward) or frozen (fixed at calibration)"""
    clip_gradient: bool = QuantConfig.clip_gradient
    """zero the straight-through gradient where |x| exceeds the global amax"""
    arithmetic: str = QuantConfig.arithmetic
    """reference (ckaqad's), runtime (compressed-tensors' served forward, element for element) or vllm-emulation"""
    global_scale: str = QuantConfig.global_scale
    """NVFP4 global scales: exact (amax/2688) or pow2 (amax rounded up to 2688*2^-k: exact in bf16 in any runtime)"""
    high_precision: str = QuantConfig.high_precision
    """norms, embeddings and unquantized layers: frozen (rounded to bf16 as the export stores them) or train (fp32)"""
    recipe: str = QuantConfig.recipe
    """named choice of what stays in high precision on top of --exclude: none or nemotron-nano-nvfp4"""
    allow_unquantized: bool = QuantConfig.allow_unquantized
    """warn (listing them) instead of failing when a block weight would stay in high precision with no rule"""

    def __post_init__(self) -> None:
        self.exclude = tuple(self.exclude)

    def quant(self, format: str, scheme: str) -> QuantConfig:
        """The QuantConfig of one PTQ student (validates the names)."""
        return QuantConfig(format=format, scheme=scheme, **asdict(self))


@dataclass
class Config:
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
    bootstrap: int = 1000
    """bootstrap resamples of the held-out sequences for each layer's CKA interval (0: no intervals)"""
    massive_factor: float = 0.0
    """robust token selection: CKA without tokens whose teacher norm is over this many times the batch median (0 off)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    seed: int = 0
    """random seed"""
    out: str = "runs/diagnose"
    """output directory"""
    quant: PTQOptions = field(default_factory=PTQOptions)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        for fmt in self.formats:
            for scheme in self.schemes:
                self.quant.quant(fmt, scheme)  # validates both names and the other quantization fields
        if self.eval_blocks < 1 or self.batch_size < 1:
            raise ConfigError("--eval-blocks and --batch-size must be at least 1")
        if self.n_sink < 0:
            raise ConfigError(f"--n-sink must be >= 0, got {self.n_sink}")
        if self.bootstrap < 0 or self.massive_factor < 0:
            raise ConfigError("--bootstrap and --massive-factor must be >= 0")

    @property
    def formats(self) -> list[str]:
        return [f.strip() for f in self.format.split(",") if f.strip()]

    @property
    def schemes(self) -> list[str]:
        return [s.strip() for s in self.scheme.split(",") if s.strip()]

    def flat(self) -> dict:
        """Every leaf field by its flag name (what diagnosis.json records as `config`)."""
        top = {k: v for k, v in asdict(self).items() if k not in ("quant", "data")}
        return {**top, **asdict(self.data), **{k: list(v) if isinstance(v, tuple) else v
                                               for k, v in asdict(self.quant).items()}}


def build_students(config: Config, teacher, blocks) -> tuple[dict[str, torch.nn.Module], dict[str, dict]]:
    """({label: student with gradients off}, {label: quantization report or the student's meta})."""
    if config.student:
        loaded = load_student(config.student, teacher)
        return {loaded.label: loaded.model.requires_grad_(False)}, {loaded.label: loaded.meta}
    students, reports = {}, {}
    for fmt in config.formats:
        for scheme in config.schemes:
            student, report = build_ptq_student(teacher, config.quant.quant(fmt, scheme), blocks)
            label = f"{fmt}-{scheme}"
            students[label] = student.requires_grad_(False)
            reports[label] = report.to_dict()
            print(report.summary())
    return students, reports


def write_outputs(out: Path, results: dict[str, Fidelity], teacher_stats: dict, meta: dict) -> None:
    """diagnosis.json (the documented format), cka_layers.png, diagnosis.md / .html and results.json."""
    d = ResultDir(out)
    teacher = {"source": meta.get("teacher"), **teacher_stats}
    kinds = {label: tables.block_kind_summary(r.layers, meta.get("block_kinds", [])) for label, r in results.items()}
    # meta["teacher"] (the source string) must not overwrite the teacher's stats.
    write_json(d.diagnosis_json, {"teacher": teacher,
                                  "variants": [{**r.to_dict(), "cka_by_block_kind": kinds[label]}
                                               for label, r in results.items()],
                                  **{k: v for k, v in meta.items() if k != "teacher"}})
    plots.plot_cka_layers({r.label: [(row["index"], row["cka"]) for row in r.layers] for r in results.values()},
                          d.cka_layers, f"Layerwise CKA to the teacher ({meta.get('teacher')})")
    md = [f"# Diagnosis: {meta.get('teacher')}", "",
          f"Data: {meta.get('data')}. Tokens for CKA: {meta.get('cka_tokens')} "
          f"({meta.get('token_rule')}).", "", *tables.fidelity_table(results, teacher_stats["perplexity"]), "",
          "Quantized layers:", "", *tables.coverage_lines(meta.get("quantization", {})), "",
          f"![per-layer CKA]({d.CKA_LAYERS})", "", "## Per-layer CKA (biased, all held-out tokens)", "",
          *tables.layer_table(results), "", "## CKA per block kind: mean (min)", "",
          *tables.block_kind_lines(kinds), "",
          *interval_lines(results), *massive_lines(teacher_stats, meta),
          f"Run time: {meta.get('runtime_s', 0):.1f} s on {meta.get('device')}.",
          ""]
    text = "\n".join(md)
    write_text(d.diagnosis_md, text)
    html.write_page(d.diagnosis_html, text, f"ckaqad diagnosis: {meta.get('teacher')}")
    quantization = meta.get("quantization", {})
    write_results(out, "diagnose",
                  [ModelResult.from_fidelity(r, quantization=quantization.get(label, {}))
                   for label, r in results.items()],
                  teacher=teacher, meta={k: v for k, v in meta.items() if k not in ("teacher", "quantization")})


def interval_lines(results: dict[str, Fidelity]) -> list[str]:
    """The per-layer bootstrap intervals (when measured): one row per layer, `cka [low, high]` per student."""
    first = next(iter(results.values()))
    if not first.layers or "cka_low" not in first.layers[0]:
        return []
    labels = list(results)
    resampled = first.layers[0].get("sequences", 0)
    lines = ["## Per-layer CKA with 95% bootstrap intervals", "",
             f"CKA ± 1.96 bootstrap standard errors, from resamples of the {resampled} held-out sequences (the "
             "tokens of a sequence are resampled together; `eval.cka_bootstrap`).", "",
             "| layer | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    by_index = {label: {row["index"]: row for row in r.layers} for label, r in results.items()}
    for row in first.layers:
        cells = []
        for label in labels:
            r = by_index[label].get(row["index"])
            cells.append(f"{r['cka']:.4f} [{r['cka_low']:.4f}, {r['cka_high']:.4f}]" if r else "–")
        lines.append(f"| {row['index']} | " + " | ".join(cells) + " |")
    widths = [r["cka_high"] - r["cka_low"] for res in results.values() for r in res.layers
              if math.isfinite(r.get("cka_high", math.nan))]
    if widths:
        lines += ["", f"Interval width: median {sorted(widths)[len(widths) // 2]:.4f}, largest {max(widths):.4f}."]
    return lines + [""]


def massive_lines(teacher_stats: dict, meta: dict) -> list[str]:
    """The massive-activation check: per teacher layer, the top tokens' share of the squared norm."""
    rows = teacher_stats.get("massive") or []
    if not rows:
        return []
    summary = teacher_stats["massive_summary"]
    lines = ["## Massive activations (teacher)", "",
             f"Share of each layer's squared hidden-state norm held by its top {MASSIVE_TOP_FRACTION:.0%} of tokens "
             f"(of {rows[0]['tokens']}, position 0 excluded; {rows[0]['top_tokens']} tokens), by its top token, "
             "and the largest token norm over the median one. Evenly spread tokens would give "
             f"about {MASSIVE_TOP_FRACTION:.0%}.", "",
             "| layer | top-1% share | top-token share | max / median norm |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['top_share']:.3f} | {r['top1_share']:.3f} | "
                     f"{r['max_over_median_norm']:.1f} |")
    factor = meta.get("config", {}).get("massive_factor", 0.0)
    if summary["dominated_layers"]:
        lines += ["", f"The top {MASSIVE_TOP_FRACTION:.0%} of tokens hold more than {MASSIVE_DOMINANT_SHARE:.0%} "
                  f"of the squared norm in layers {summary['dominated_layers']} (largest: "
                  f"{summary['max_top_share']:.1%} in layer {summary['max_top_share_layer']}): CKA there is "
                  "mostly about those few tokens. "
                  + (f"This diagnosis leaves out tokens above {factor:g}× the median norm." if factor else
                     f"Rerun with `--massive-factor {MASSIVE_SUGGESTED_FACTOR:g}` to leave tokens above "
                     f"{MASSIVE_SUGGESTED_FACTOR:g}× the batch's median norm out of CKA (the robust selection).")]
    else:
        lines += ["", f"No layer is dominated (largest top-1% share {summary['max_top_share']:.1%}, layer "
                  f"{summary['max_top_share_layer']})."]
    return lines + [""]


def print_summary(results: dict[str, Fidelity], teacher_ppl: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    layers = Table(title="Per-layer CKA to the teacher (sinks excluded)")
    layers.add_column("layer", justify="right")
    for label in results:
        layers.add_column(label, justify="right")
    by_index = {label: {row["index"]: row["cka"] for row in r.layers} for label, r in results.items()}
    for row in next(iter(results.values())).layers:
        layers.add_row(str(row["index"]), *(f"{by_index[lb].get(row['index'], float('nan')):.4f}" for lb in results))
    console.print(layers)
    summary = Table(title="Fidelity to the teacher (held out)")
    for col in ("model", "mean CKA", "min CKA", "KL/token", "ppl", "top-1 agree"):
        summary.add_column(col, justify="right")
    summary.add_row("teacher", "1", "1", "0", f"{teacher_ppl:.3f}", "1")
    for r in results.values():
        summary.add_row(r.label, f"{r.mean_cka:.4f}", f"{r.min_cka:.4f} ({r.min_cka_layer})",
                        f"{r.kl_per_token:.4f}", f"{r.perplexity:.3f}", f"{r.top1_agreement:.3f}")
    console.print(summary)


def run(config: Config, progress: bool = True) -> dict:
    """The `ckaqad diagnose` job. Validates everything before writing; writes --out atomically.

    Returns {"results": {label: Fidelity}, "teacher": teacher stats, "meta": what diagnosis.json records}.
    """
    out = check_writable(config.out)
    start = time.perf_counter()
    torch.manual_seed(config.seed)
    loaded = load_model(config.teacher, device=config.device)
    teacher, tokenizer = loaded.model, loaded.tokenizer
    device = next(teacher.parameters()).device
    blocks = load_blocks(config.data, teacher, tokenizer)
    students, reports = build_students(config, teacher, blocks)
    n_eval = min(config.eval_blocks, blocks.heldout.shape[0])
    exclude = tuple(i for i in (tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        results, teacher_stats = measure_fidelity(
            teacher, students, eval_batches(blocks.heldout, config.batch_size, device, limit=n_eval),
            n_sink=config.n_sink, exclude_token_ids=exclude, progress=progress,
            total=math.ceil(n_eval / config.batch_size), bootstrap=config.bootstrap,
            massive_factor=config.massive_factor)
    runtime = time.perf_counter() - start
    meta = {"teacher": config.teacher, "data": blocks.describe(), "device": str(device),
            "cka_tokens": next(iter(results.values())).cka_tokens, "token_rule": token_rule(config.n_sink),
            "eval_blocks": n_eval, "seq_len": config.data.seq_len, "runtime_s": runtime,
            "quantization": reports, "config": config.flat(),
            "block_kinds": [block_kind(b) for b in decoder_layers(students[next(iter(students))])]}
    with atomic_directory(out) as tmp:
        write_outputs(tmp, results, teacher_stats, meta)
    if progress:
        print_summary(results, teacher_stats["perplexity"])
        kinds = {label: tables.block_kind_summary(r.layers, meta["block_kinds"]) for label, r in results.items()}
        print("CKA per block kind, mean (min):", "; ".join(
            f"{label}: " + ", ".join(f"{k} {v['mean']:.4f} ({v['min']:.4f})" for k, v in s.items())
            for label, s in kinds.items()))
        print(f"wrote {out}/diagnosis.json, diagnosis.md, diagnosis.html, cka_layers.png, results.json "
              f"({runtime:.1f} s)")
    return {"results": results, "teacher": teacher_stats, "meta": meta}
