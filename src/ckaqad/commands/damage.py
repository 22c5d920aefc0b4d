"""`ckaqad damage`: damage a model reproducibly and measure the damage — the student of a recovery study.

`--kind` (damage/kinds.py): `magnitude` / `wanda` (unstructured, `--sparsity`), `2:4` (`--score magnitude|wanda`),
`drop-blocks` (`--blocks 26-29`, or `--drop K` least important by `--importance bi|kl`), `forget` (CE
fine-tuning on `--forget-data`), `nvfp4` (the PTQ student, `--format/--scheme`). Calibration (Wanda, block
importance, NVFP4) uses the first `--calib-batches` × `--calib-batch-size` training blocks of `--data`, as every
PTQ student does; the damage is measured on `--eval-blocks` held-out blocks.

`--out` receives an ordinary HF model directory (a student directory for nvfp4, which `--student` reads the
same way), `ckaqad_damage.json` (what was done and the fidelity of the damaged model to the original:
KL, perplexity, per-layer CKA; for forget also the narrow-corpus perplexities) and `damage.md`. Every input
is checked before anything is written.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ckaqad.capture import LayerMap
from ckaqad.damage.depth import (
    IMPORTANCE,
    block_influence,
    block_removal_kl,
    check_drop_count,
    drop_blocks_,
    kept_layer_map,
    least_important,
    parse_block_list,
)
from ckaqad.damage.forget import ForgetConfig, forget_finetune
from ckaqad.damage.kinds import DAMAGE_KINDS, PRUNING_KINDS
from ckaqad.damage.pruning import SCORES, check_n_m, check_sparsity, prunable_linears, prune_, sparsity_pattern
from ckaqad.data.blocks import DataConfig, TokenBlocks, build_blocks, eval_batches, load_blocks
from ckaqad.data.documents import load_documents
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity, token_rule
from ckaqad.files import atomic_directory, check_writable, write_json, write_text
from ckaqad.models.arch import num_layers
from ckaqad.models.load import LoadedModel, load_model
from ckaqad.paths import DamageDir
from ckaqad.quant.linear import QuantConfig
from ckaqad.students.spec import build_ptq_student, calibration_batches
from ckaqad.students.store import save_student_dir

HELP = "damage a model reproducibly (pruning, 2:4, depth pruning, forgetting, NVFP4) and measure the damage"
SCHEMA = "ckaqad.damage/1"


@dataclass
class Config:
    kind: str | None = None
    """damage: magnitude, wanda, 2:4, drop-blocks, forget or nvfp4"""
    teacher: str = "default"
    """the model to damage: default (embedded SmolLM2-135M-Instruct), a .gguf file or an HF model directory"""
    out: str = "runs/damaged"
    """output directory: the damaged model and its damage report"""
    overwrite: bool = False
    """replace an existing --out"""
    sparsity: float = 0.5
    """fraction of each pruned layer's weights set to zero (magnitude, wanda), strictly between 0 and 1"""
    score: str = "wanda"
    """2:4 score: wanda (|W|·‖x‖ from calibration activations) or magnitude (|W|)"""
    blocks: str | None = None
    """drop-blocks: the decoder blocks to remove, like 26-29 or 3,7"""
    drop: int = 0
    """drop-blocks: remove the K least important blocks instead of a list"""
    importance: str = "bi"
    """drop-blocks importance: bi (ShortGPT block influence) or kl (KL of the output with the block skipped)"""
    eval_blocks: int = 16
    """held-out blocks on which the damage is measured"""
    batch_size: int = 4
    """blocks per evaluation batch"""
    n_sink: int = 1
    """leading positions of each sequence excluded from CKA (attention sinks)"""
    seed: int = 0
    """random seed (forgetting data order)"""
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""
    forget: ForgetConfig = field(default_factory=ForgetConfig)
    quant: QuantConfig = field(default_factory=QuantConfig)
    data: DataConfig = field(default_factory=DataConfig)

    def __post_init__(self) -> None:
        if self.kind is None:
            raise ConfigError(f"--kind is required; choose from: {', '.join(DAMAGE_KINDS.names())}")
        DAMAGE_KINDS.check(self.kind)
        if self.kind in ("magnitude", "wanda"):
            check_sparsity(self.sparsity)
        if self.score not in SCORES:
            raise ConfigError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.importance not in IMPORTANCE:
            raise ConfigError(f"--importance must be one of {', '.join(IMPORTANCE)}, got {self.importance!r}")
        if self.kind == "drop-blocks" and (self.blocks is None) == (self.drop == 0):
            raise ConfigError("--kind drop-blocks needs exactly one of --blocks LIST or --drop K")
        if self.kind == "forget" and not self.forget.forget_data:
            raise ConfigError("--kind forget needs --forget-data (the narrow corpus)")
        if self.eval_blocks < 1 or self.batch_size < 1 or self.n_sink < 0:
            raise ConfigError("--eval-blocks and --batch-size must be at least 1, --n-sink at least 0")


@dataclass
class Plan:
    """What the checks found, before any work: the removed blocks or the narrow corpus."""

    removed: list[int] | None = None
    narrow: TokenBlocks | None = None


def check_out(config: Config) -> Path:
    out = check_writable(config.out)
    if out.exists() and any(out.iterdir()) and not config.overwrite:
        raise ConfigError(f"--out {out} exists and is not empty; choose another or pass --overwrite")
    return out


def plan(config: Config, teacher: LoadedModel) -> Plan:
    """Every check that needs the model or the data (ConfigError / FormatError / DataError)."""
    model = teacher.model
    depth = num_layers(model)
    if config.kind in PRUNING_KINDS and not prunable_linears(model):
        raise ConfigError("the model has no Linear layers inside its decoder blocks to prune")
    if config.kind == "2:4":
        check_n_m(model)
    if config.kind == "drop-blocks":
        if config.blocks is not None:
            return Plan(removed=parse_block_list(config.blocks, depth))
        check_drop_count(config.drop, depth)
    if config.kind == "forget":
        docs = load_documents(config.forget.forget_data, teacher.tokenizer)
        narrow = build_blocks(docs, teacher.tokenizer, config.data.seq_len, config.data.heldout_fraction,
                              source=str(config.forget.forget_data))
        return Plan(narrow=narrow)
    return Plan()


def apply_damage(config: Config, teacher: LoadedModel, blocks: TokenBlocks, plan_: Plan
                 ) -> tuple[torch.nn.Module, dict]:
    """(the damaged model, what was done) — the teacher is untouched."""
    device = next(teacher.model.parameters()).device
    calibration = lambda: calibration_batches(blocks, config.quant, device)  # noqa: E731 (a fresh iterator each use)
    if config.kind == "nvfp4":
        student, report = build_ptq_student(teacher.model, config.quant, blocks)
        return student.requires_grad_(False), {"quantization": report.to_dict(), "quant": asdict(config.quant)}
    model = copy.deepcopy(teacher.model).float().requires_grad_(False).eval()
    if config.kind in PRUNING_KINDS:
        structure = "2:4" if config.kind == "2:4" else "unstructured"
        score = config.score if config.kind == "2:4" else config.kind
        with torch.no_grad():
            report = prune_(model, structure, score, config.sparsity, calibration() if score == "wanda" else None)
        return model, {"pruning": report.to_dict(), "masked_layers": sorted(report.layers)}
    if config.kind == "drop-blocks":
        scores = None
        removed = plan_.removed
        if removed is None:
            batches = list(calibration())
            scores = (block_influence(model, batches, config.n_sink) if config.importance == "bi"
                      else block_removal_kl(model, batches))
            removed = least_important(scores, config.drop)
        kept = drop_blocks_(model, removed)
        return model, {"depth": {"removed": removed, "kept": kept, "importance": config.importance if scores else None,
                                 "scores": scores}, "layer_map": kept_layer_map(kept)}
    # forget
    narrow = plan_.narrow
    report = forget_finetune(model, narrow.train, narrow.heldout, blocks.heldout, config.forget, config.eval_blocks,
                             seed=config.seed)
    source = Path(config.forget.forget_data).expanduser().resolve()
    return model, {"forget": report.to_dict(), "forget_data": str(source), "narrow_data": narrow.describe()}


def measure_damage(config: Config, teacher: LoadedModel, damaged: torch.nn.Module, blocks: TokenBlocks,
                   detail: dict) -> dict:
    """Fidelity of the damaged model to the original on the held-out blocks (through the kept-block map)."""
    device = next(teacher.model.parameters()).device
    layer_map = None
    if "layer_map" in detail:
        layer_map = LayerMap.parse(detail["layer_map"], num_layers(damaged), num_layers(teacher.model))
    exclude = tuple(i for i in (teacher.tokenizer.bos_token_id,) if i is not None)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        results, teacher_stats = measure_fidelity(
            teacher.model, {"damaged": damaged},
            eval_batches(blocks.heldout, config.batch_size, device, limit=config.eval_blocks),
            n_sink=config.n_sink, exclude_token_ids=exclude, progress=False, layer_map=layer_map)
    return {"fidelity": results["damaged"].to_dict(), "teacher_perplexity": teacher_stats["perplexity"],
            "eval_blocks": min(config.eval_blocks, blocks.heldout.shape[0]), "token_rule": token_rule(config.n_sink)}


def render_md(report: dict) -> str:
    f = report["fidelity"]
    lines = [f"# Damage: {report['kind']}", "",
             f"Teacher `{report['teacher']}`; {report['data']}; measured on {report['eval_blocks']} held-out blocks, "
             f"CKA over {report['token_rule']}.", "",
             "| model | KL/token | ppl | top-1 agree | mean CKA | min CKA (block) |", "|---|---|---|---|---|---|",
             f"| teacher | 0 | {report['teacher_perplexity']:.3f} | 1 | 1 | 1 |",
             f"| damaged | {f['kl_per_token']:.4f} | {f['perplexity']:.3f} | {f['top1_agreement']:.3f} | "
             f"{f['mean_cka']:.4f} | {f['min_cka']:.4f} ({f['min_cka_layer']}) |", ""]
    if "pruning" in report:
        p = report["pruning"]
        lines += [f"Pruning: {p['structure']} by {p['score']} score; {p['sparsity']:.4f} of the pruned layers' weights "
                  f"are zero ({p['model_sparsity']:.4f} of all parameters), {len(p['layers'])} layers.", ""]
    if "depth" in report:
        d = report["depth"]
        how = f" (the least important by {d['importance']})" if d["importance"] else ""
        lines += [f"Removed blocks {d['removed']}{how}; the student's blocks are the teacher's {d['kept']} "
                  f"(layer map `{report['layer_map']}`).", ""]
    if "forget" in report:
        g = report["forget"]
        lines += [f"Forgetting: {g['steps']} CE steps on {report['narrow_data']}"
                  f"{' (stopped early: the general perplexity had risen enough)' if g['stopped_early'] else ''}.", "",
                  "| step | general ppl | narrow ppl |", "|---|---|---|",
                  *[f"| {h['step']} | {h['general_perplexity']:.3f} | {h['narrow_perplexity']:.3f} |"
                    for h in g["history"]],
                  "", "The general held-out perplexity " + ("rose." if g["risen"] else "did NOT rise."), ""]
    if "quantization" in report:
        q = report["quant"]
        lines += [f"NVFP4 PTQ student: {q['format']} {q['scheme']}, {len(report['quantization'].get('quantized', []))} "
                  "layers quantized.", ""]
    lines.append(f"Run time {report['runtime_s']:.1f} s.")
    return "\n".join(lines) + "\n"


def run(config: Config, teacher_loaded: LoadedModel | None = None) -> dict:
    """Check, damage, measure and write `--out`; returns the damage report."""
    out = check_out(config)
    started = time.perf_counter()
    teacher = teacher_loaded or load_model(config.teacher, device=config.device)
    torch.manual_seed(config.seed)
    blocks = load_blocks(config.data, teacher.model, teacher.tokenizer)
    plan_ = plan(config, teacher)
    damaged, detail = apply_damage(config, teacher, blocks, plan_)
    report = {"schema": SCHEMA, "kind": config.kind, "teacher": config.teacher, "data": blocks.describe(),
              "config": {k: v for k, v in asdict(config).items() if k not in ("quant",) or config.kind == "nvfp4"},
              **detail, **measure_damage(config, teacher, damaged, blocks, detail)}
    if config.kind in PRUNING_KINDS:
        report["sparsity_pattern"] = sparsity_pattern(damaged)
    report["runtime_s"] = time.perf_counter() - started
    with atomic_directory(out) as tmp:
        if config.kind == "nvfp4":
            save_student_dir(damaged, tmp, teacher.tokenizer, extra={"label": out.name, "teacher": config.teacher})
        else:
            damaged.save_pretrained(tmp)
            teacher.tokenizer.save_pretrained(tmp)
        target = DamageDir(tmp)
        write_json(target.report, report)
        write_text(target.report_md, render_md(report))
        if config.kind in PRUNING_KINDS:
            write_json(target.sparsity, report["sparsity_pattern"])
    f = report["fidelity"]
    print(f"{config.kind}: KL {f['kl_per_token']:.4f}, ppl {f['perplexity']:.3f} (teacher "
          f"{report['teacher_perplexity']:.3f}), mean CKA {f['mean_cka']:.4f}, min CKA {f['min_cka']:.4f} "
          f"({report['runtime_s']:.0f} s) -> {out}")
    return report
