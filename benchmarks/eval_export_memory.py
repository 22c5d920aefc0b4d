"""Peak host memory per rank of what a sharded `ckaqad distill` does after training: the held-out evaluation and
the write of the final student directory. Compares two source trees side by side (e.g. main before the sharded
evaluation and streaming write, and this tree):

    python benchmarks/eval_export_memory.py --hidden 1024 --layers 16 --src before=/work/main/src --src after=src \
        [--shard-size-mb 64]

Saves a random Llama of the given shape (byte-level tokenizer, 259 tokens) as the teacher. For each source tree,
`torchrun`-style 2 processes (gloo, CPU) build the distill trainee (PTQ student sharded with FSDP2, teacher
replicated) and then, per phase, reset the peak RSS (`/proc/self/clear_refs` = 5) and read it back (VmHWM)
after: `trainer.evaluate` (the held-out evaluation, `--eval-blocks` blocks) and the final student write (rank 0
writes `student/`). Timed: nothing. Reported per rank: RSS when the phase starts, peak during it, and the growth
(peak minus start), in GiB; glibc's mmap threshold is fixed at 128 KiB so freed tensors leave the RSS. Prints a
table and JSON.
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
GIB = 2**30


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def phase(fn) -> dict:
    start = status_bytes("VmRSS")
    reset_peak()
    fn()
    peak = status_bytes("VmHWM")
    return {"start": start, "peak": peak, "growth": peak - start}


def write_final(distill, trainee, config, world) -> None:
    """The final student write of the tree under test: `write_final_student` (streamed from the shards), or,
    in a tree without it, what `distill._run` did before it (the full state dict assembled on rank 0)."""
    if hasattr(distill, "write_final_student"):
        distill.write_final_student(trainee, config, world)
        return
    from ckaqad.files import atomic_directory
    from ckaqad.parallel.fsdp import full_state_dict
    from ckaqad.students.store import save_student_dir

    state = full_state_dict(trainee.student)
    if world.is_main:
        with atomic_directory(trainee.run.student.root) as tmp:
            save_student_dir(trainee.student, tmp, trainee.tokenizer, state=state)


def worker(args: argparse.Namespace) -> None:
    from ckaqad import cli
    from ckaqad.commands import distill
    from ckaqad.parallel.dist import joined_world
    from ckaqad.train import trainer
    from ckaqad.train.checkpointer import CheckpointConfig

    out = args.work / f"run-{args.label}"
    config = cli.parse("distill", ["--teacher", str(args.work / "teacher"), "--data", str(args.work / "data.txt"),
                                   "--seq-len", str(args.seq_len), "--steps", "1", "--batch-size", str(args.nproc),
                                   "--cka-tokens", "16", "--eval-blocks", str(args.eval_blocks),
                                   "--calib-batches", "1", "--calib-batch-size", str(args.nproc), "--device", "cpu",
                                   "--no-progress", "--teacher-sharding", "replicate", "--out", str(out)]
                        # a tree before the streaming write has no file size to choose
                        + (["--shard-size-mb", str(args.shard_size_mb)]
                           if args.shard_size_mb and hasattr(CheckpointConfig, "shard_size_mb") else []))
    with joined_world("cpu", 600) as world:
        trainee, _ = distill.build_trainee(config, world=world)
        record = {"rank": world.rank, "threads": __import__("torch").get_num_threads(),
                  "evaluation": phase(lambda: trainer.evaluate(trainee)),
                  "student_write": phase(lambda: write_final(distill, trainee, config, world))}
        (args.work / f"mem-{args.label}-{world.rank}.json").write_text(json.dumps(record))


def make_teacher(work: Path, hidden: int, layers: int) -> int:
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    sys.path.insert(0, str(ROOT / "tests" / "commands"))
    from conftest import make_tiny_tokenizer
    from test_distill_command import corpus_text

    heads = max(hidden // 64, 1)
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=hidden, intermediate_size=hidden * 11 // 4 // 64 * 64,
                                      num_hidden_layers=layers, num_attention_heads=heads,
                                      num_key_value_heads=max(heads // 4, 1), tie_word_embeddings=False,
                                      max_position_embeddings=256, bos_token_id=256, eos_token_id=257,
                                      pad_token_id=258)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(work / "teacher")
    make_tiny_tokenizer().save_pretrained(work / "teacher")
    (work / "data.txt").write_text(corpus_text() * 4)
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--processes", dest="nproc", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--eval-blocks", type=int, default=8)
    parser.add_argument("--shard-size-mb", type=int, default=0, help="distill's file size (default: its own)")
    parser.add_argument("--src", action="append", default=None, help="LABEL=PATH of a source tree (repeatable)")
    parser.add_argument("--json", default=None)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--label", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sources = dict(s.split("=", 1) for s in (args.src or [f"this={ROOT / 'src'}"]))
    with tempfile.TemporaryDirectory(prefix="eval-export-memory-") as tmp:
        work = Path(tmp)
        params = make_teacher(work, args.hidden, args.layers)
        rows = []
        for label, src in sources.items():
            # A fixed mmap threshold: every tensor over 128 KiB is its own mapping, returned to the system when
            # freed, so a phase's peak is not hidden by heap that an earlier phase freed but glibc kept.
            env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(src).resolve()),
                   "MALLOC_MMAP_THRESHOLD_": "131072"}
            cmd = [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc-per-node", str(args.nproc),
                   str(Path(__file__).resolve()), "--worker", "--label", label, "--work", str(work),
                   "--seq-len", str(args.seq_len), "--processes", str(args.nproc), "--eval-blocks",
                   str(args.eval_blocks), "--shard-size-mb", str(args.shard_size_mb)]
            done = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"{label}: torchrun failed\n{done.stderr[-3000:]}")
            for rank in range(args.nproc):
                record = json.loads((work / f"mem-{label}-{rank}.json").read_text())
                rows.append({"tree": label, **record})
    import torch

    print(f"# torch {torch.__version__}, CPU, {args.nproc} processes (gloo, 1 thread each); random Llama hidden "
          f"{args.hidden} x {args.layers} blocks, {params / 1e6:.0f} M parameters ({4 * params / GIB:.2f} GiB FP32)")
    print(f"{'tree':<8} {'rank':>4}  {'eval start':>10} {'eval peak':>9} {'eval +':>7}  "
          f"{'write start':>11} {'write peak':>10} {'write +':>7}   (GiB)")
    for r in rows:
        e, w = r["evaluation"], r["student_write"]
        print(f"{r['tree']:<8} {r['rank']:>4}  {e['start'] / GIB:>10.2f} {e['peak'] / GIB:>9.2f} "
              f"{e['growth'] / GIB:>7.2f}  {w['start'] / GIB:>11.2f} {w['peak'] / GIB:>10.2f} "
              f"{w['growth'] / GIB:>7.2f}")
    result = {"hidden": args.hidden, "layers": args.layers, "parameters": params, "processes": args.nproc,
              "eval_blocks": args.eval_blocks, "shard_size_mb": args.shard_size_mb, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
