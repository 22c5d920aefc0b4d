"""Peak host memory per rank of a CPU `ckaqad distill` under torchrun against `ckaqad plan`'s per-rank estimate.

    python benchmarks/rss_vs_plan.py --hidden 2048 --intermediate 8192 --layers 16 --teacher-sharding shard \
        [--cpu-offload] [--optimizer adamw-bf16] [--eval-gathers] [--glibc-default]

Saves a random Llama of the given shape (byte-level tokenizer, 259 tokens; fp32 safetensors) as the teacher,
trains 2 steps of kl+cka on 2 processes (gloo, one thread each; the models built on meta and each rank filling
its shards), and has each rank report its peak RSS (VmHWM from /proc/self/status), its RSS before anything was
loaded, and the peak of each phase (build, load, calibrate, step, checkpoint, eval, write: VmHWM reset through
/proc/self/clear_refs at every boundary). The measured VmHWM is compared with the planner's
`MemoryPlan.cpu_rank_peak` (FP32 compute and teacher on CPU; the runtime included). Prints a table and JSON.
`--eval-gathers`: plan the held-out evaluation that gathers the whole student (code without the sharded one);
`--glibc-default`: leave glibc's growing mmap threshold (`parallel.memory.return_freed_host_memory` undone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


# The phases of a run whose peaks are measured apart: each wrapped function's peak RSS (VmHWM, reset by writing
# 5 to /proc/self/clear_refs at every boundary), nested ones cut out of the outer; "other" is the time between.
PHASES = (("distill", "materialize_", "load"), ("distill", "calibrate_ptq_student", "calibrate"),
          ("distill", "build_trainee", "build"), ("trainer", "train_step", "step"),
          ("checkpointer.CheckpointManager", "save", "checkpoint"), ("trainer", "evaluate", "eval"),
          ("distill", "full_state_dict", "gather"), ("distill", "save_student_dir", "save"))


def instrument(baseline: int) -> dict:
    """Wrap the PHASES' functions; returns {phase: peak RSS growth over `baseline`}, filled as the run goes."""
    from ckaqad.commands import distill
    from ckaqad.train import checkpointer, trainer

    peaks: dict = {}
    held: dict = {}

    def mark(name: str) -> None:
        peaks[name] = max(peaks.get(name, 0), rss_bytes("VmHWM") - baseline)
        held[name] = rss_bytes("VmRSS") - baseline
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS

    def wrap(fn, name):
        def wrapped(*args, **kwargs):
            mark("other")
            try:
                return fn(*args, **kwargs)
            finally:
                mark(name)
        return wrapped

    owners = {"distill": distill, "trainer": trainer, "checkpointer.CheckpointManager": checkpointer.CheckpointManager}
    for owner, attr, name in PHASES:
        if hasattr(owners[owner], attr):  # a phase the code does not have (no gather: a streamed student) is skipped
            setattr(owners[owner], attr, wrap(getattr(owners[owner], attr), name))
    Path("/proc/self/clear_refs").write_text("5")
    return {"peaks": peaks, "held": held, "mark": mark}


def worker(args: argparse.Namespace) -> None:
    from ckaqad import cli
    from ckaqad.commands import distill

    if args.glibc_default:  # keep glibc's growing mmap threshold (what ckaqad ran with before it fixed it)
        distill.return_freed_host_memory = lambda: False
    baseline = rss_bytes("VmRSS")  # the interpreter with torch, transformers and ckaqad imported
    measured = instrument(baseline)
    config = cli.parse("distill", ["--teacher", str(args.work / "teacher"), "--data", str(args.work / "data.txt"),
                                   "--seq-len", str(args.seq_len), "--steps", "2", "--batch-size", str(args.nproc),
                                   "--cka-tokens", "16", "--eval-every", "0", "--eval-blocks", str(args.nproc),
                                   "--calib-batches", "1", "--calib-batch-size", str(args.nproc), "--device", "cpu",
                                   "--no-progress", "--save-every", "1000", "--optimizer", args.optimizer,
                                   "--teacher-sharding", args.teacher_sharding, "--load-method", args.load_method,
                                   "--out", str(args.work / "run")] + (["--cpu-offload"] if args.cpu_offload else [])
                        + (["--activation-checkpointing"] if args.activation_checkpointing else []))
    distill.run(config)
    measured["mark"]("other")
    rank = int(os.environ["RANK"])
    (args.work / f"rss-{rank}.json").write_text(json.dumps({
        "baseline": baseline, "peak": baseline + max(measured["peaks"].values()), "phases": measured["peaks"],
        "held": measured["held"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--intermediate", type=int, default=0, help="MLP width (default: hidden x 11/4)")
    parser.add_argument("--teacher-sharding", default="replicate")
    parser.add_argument("--load-method", default="dcp")
    parser.add_argument("--eval-gathers", action="store_true",
                        help="plan the evaluation that gathers the whole student (code without the sharded one)")
    parser.add_argument("--glibc-default", action="store_true",
                        help="do not fix glibc's mmap threshold (parallel.memory.return_freed_host_memory)")
    parser.add_argument("--processes", dest="nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--optimizer", default="adamw")
    parser.add_argument("--cpu-offload", action="store_true")
    parser.add_argument("--teacher-cache", default=None, help="directory keeping the random teachers between runs")
    parser.add_argument("--prepare", action="store_true", help="only make the teacher in --teacher-cache")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "commands"))
    from conftest import make_tiny_tokenizer
    from test_distill_command import corpus_text

    from ckaqad.parallel.memory import GIB, LlamaShape, plan_memory, return_freed_host_memory

    intermediate = args.intermediate or args.hidden * 11 // 4 // 64 * 64
    heads = max(args.hidden // 64, 1)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=args.hidden, intermediate_size=intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=heads,
                                      num_key_value_heads=max(heads // 4, 1), tie_word_embeddings=False,
                                      bos_token_id=256, eos_token_id=257, pad_token_id=258)
    return_freed_host_memory()  # this process's freed teacher must not stay in its RSS beside the run's
    with tempfile.TemporaryDirectory(prefix="rss-vs-plan-", dir=args.teacher_cache) as tmp:
        work = Path(tmp)
        # `--teacher-cache DIR`: the random teacher of this shape is made once and reused (a 1B one takes minutes)
        saved = Path(args.teacher_cache or tmp) / f"teacher-{args.hidden}-{intermediate}-{args.layers}"
        if not (saved / "config.json").is_file():
            torch.manual_seed(0)  # the same random teacher for every option
            transformers.LlamaForCausalLM(config).save_pretrained(saved)
            make_tiny_tokenizer().save_pretrained(saved)
        if args.prepare:
            return
        (work / "teacher").symlink_to(saved)
        (work / "data.txt").write_text(corpus_text() * 4)
        env = {**os.environ, "OMP_NUM_THREADS": "1",
               "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")])}
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
               __file__, "--worker", "--work", str(work), "--processes", str(args.nproc),
               "--seq-len", str(args.seq_len), "--optimizer", args.optimizer,
               "--teacher-sharding", args.teacher_sharding, "--load-method", args.load_method] \
            + (["--cpu-offload"] if args.cpu_offload else []) + (["--glibc-default"] if args.glibc_default else []) \
            + (["--activation-checkpointing"] if args.activation_checkpointing else [])
        launch = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if launch.returncode:
            sys.exit(launch.stderr[-3000:])
        ranks = [json.loads((work / f"rss-{r}.json").read_text()) for r in range(args.nproc)]
        metrics = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()]
    shape = LlamaShape.from_config(config.to_dict(), "random")
    rows = []
    for rank, measured in enumerate(ranks):
        plan = plan_memory(shape, args.nproc, args.nproc, args.seq_len,
                           teacher_sharded=args.teacher_sharding == "shard", compute_bytes=4, teacher_bytes=4,
                           rank=rank, optimizer=args.optimizer, offload=args.cpu_offload,
                           eval_gathers=args.eval_gathers)
        # the runtime included: all of VmHWM
        estimate = plan.cpu_rank_peak(checkpointing=args.activation_checkpointing, rank=rank)
        grown = measured["peak"] - measured["baseline"]
        rows.append({"rank": rank, "baseline": measured["baseline"], "peak": measured["peak"], "grown": grown,
                     "plan": estimate, "ratio": measured["peak"] / estimate, "phases": measured["phases"],
                     "held": measured["held"]})
    losses = [m["loss"] for m in metrics if m["kind"] == "train"]
    step_seconds = [round(m["step_time_s"], 2) for m in metrics if m["kind"] == "train"]
    print(f"random Llama {shape.parameters / 1e6:.0f} M parameters (hidden {args.hidden}, {args.layers} blocks), "
          f"{args.nproc} processes, {args.optimizer}{', cpu offload' if args.cpu_offload else ''}"
          f"{', activation checkpointing' if args.activation_checkpointing else ''}, teacher "
          f"{args.teacher_sharding}, load {args.load_method}{', glibc default' if args.glibc_default else ''}; "
          f"losses {losses}, step seconds {step_seconds}")
    print(f"{'rank':>4} {'baseline GiB':>12} {'peak GiB':>9} {'peak-baseline':>13} {'plan GiB':>9} "
          f"{'peak/plan':>9}")
    for r in rows:
        print(f"{r['rank']:>4} {r['baseline'] / GIB:12.2f} {r['peak'] / GIB:9.2f} {r['grown'] / GIB:13.2f} "
              f"{r['plan'] / GIB:9.2f} {r['ratio']:9.2f}")
    print("peak RSS growth per phase, GiB (held at its end):")
    for r in rows:
        print(f"  rank {r['rank']}: " + ", ".join(f"{name} {peak / GIB:.2f} ({r['held'][name] / GIB:.2f})"
                                               for name, peak in r["phases"].items()))
    result = {"parameters": shape.parameters, "hidden": args.hidden, "layers": args.layers, "nproc": args.nproc,
              "optimizer": args.optimizer, "cpu_offload": args.cpu_offload,
              "activation_checkpointing": args.activation_checkpointing, "seq_len": args.seq_len,
              "intermediate": intermediate, "command": " ".join(sys.argv), "teacher_sharding": args.teacher_sharding,
              "load_method": args.load_method, "glibc_default": args.glibc_default, "losses": losses,
              "step_seconds": step_seconds, "ranks": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
