"""How each rank fills a sharded model from safetensors: DCP's HuggingFace reader vs rank 0's per-tensor
broadcast (both from the meta device, parallel/loading.py) vs today's whole load (`from_pretrained` on every
rank, then `fully_shard`). Time and per-rank peak RSS growth (VmHWM minus the RSS before loading).

    python benchmarks/meta_load.py --hidden 2048 --intermediate 8192 --layers 8 --processes 2 [--dtype bf16]
    python benchmarks/meta_load.py --hidden 1024 --intermediate 1024 --layers 4 --experts 16   # a Qwen3-MoE

Saves a random Llama of that shape (or, with `--experts N`, a Qwen3-MoE of N experts of that intermediate size,
which save_pretrained writes one expert at a time, as hub MoE checkpoints are) as safetensors, `--dtype` as a
teacher's files are (bf16 for a GGUF cache), then for each method launches `torchrun --nproc-per-node N` (gloo,
CPU, one thread per rank); every rank builds the teacher on meta, shards it per block (`fully_shard`), fills it
as an fp32 teacher, and reports. The three launches run one after the other in the same script, so the ratios
are side by side. Prints a table and JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
METHODS = ("dcp", "broadcast", "whole")


def status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def worker(args: argparse.Namespace) -> None:
    import torch
    import torch.distributed as dist

    from ckaqad.models.load import load_model, load_model_on_meta
    from ckaqad.parallel.fsdp import shard_model
    from ckaqad.parallel.loading import materialize_

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    if args.return_freed:
        from ckaqad.parallel.memory import return_freed_host_memory

        return_freed_host_memory()
    directory = args.work / "model"
    # imports and the tokenizer first, so that the peak measured is the weights' alone
    import torch.distributed.checkpoint  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    import transformers.models.qwen3_moe.modeling_qwen3_moe  # noqa: F401
    from transformers import AutoTokenizer
    AutoTokenizer.from_pretrained(directory)
    dist.barrier()
    baseline = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: the peak of what follows
    start = time.perf_counter()
    if args.method == "whole":
        model = load_model(directory, device="cpu").model
        shard_model(model, "cpu", trainable=False)
    else:
        model = load_model_on_meta(directory, torch.float32).model
        shard_model(model, "cpu", trainable=False)
        materialize_(model, directory, "cpu", args.method)
    dist.barrier()
    seconds = time.perf_counter() - start
    # read before the checksum, whose float64 copies of the largest local tensor would set the peak
    grown, after = status("VmHWM") - baseline, status("VmRSS") - baseline
    checksum = float(sum(p.to_local().double().abs().sum() for p in model.parameters()))
    dist.all_reduce(t := torch.tensor([checksum], dtype=torch.float64))
    rank = dist.get_rank()
    (args.work / f"{args.method}-{rank}.json").write_text(json.dumps({
        "seconds": seconds, "grown": grown, "after": after, "checksum": float(t)}))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=8192)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--processes", dest="nproc", type=int, default=2)
    parser.add_argument("--experts", type=int, default=0, help="a Qwen3-MoE of this many experts (0: a Llama)")
    parser.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    parser.add_argument("--json", default=None)
    parser.add_argument("--return-freed", action="store_true",
                        help="glibc's mmap threshold fixed as distill sets it on CPU (parallel.memory)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--method", default="dcp", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    import torch
    import transformers

    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import make_tiny_tokenizer

    heads = max(args.hidden // 64, 1)
    common = dict(vocab_size=259, hidden_size=args.hidden, intermediate_size=args.intermediate,
                  num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(heads // 4, 1),
                  tie_word_embeddings=False, bos_token_id=256, eos_token_id=257, pad_token_id=258)
    config = transformers.Qwen3MoeConfig(**common, num_experts=args.experts, moe_intermediate_size=args.intermediate,
                                         num_experts_per_tok=2, head_dim=64) if args.experts else \
        transformers.LlamaConfig(**common)
    rows = []
    with tempfile.TemporaryDirectory(prefix="meta-load-") as tmp:
        work = Path(tmp)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        model = model.to(torch.bfloat16 if args.dtype == "bf16" else torch.float32)
        parameters = sum(p.numel() for p in model.parameters())
        model.save_pretrained(work / "model")
        del model
        make_tiny_tokenizer().save_pretrained(work / "model")
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT / "src"),
                                                                                      str(ROOT / "tests")])}
        for method in METHODS:
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(args.nproc),
                   __file__, "--worker", "--work", str(work), "--method", method] + \
                (["--return-freed"] if args.return_freed else [])
            launch = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if launch.returncode:
                sys.exit(launch.stderr[-3000:])
            for rank in range(args.nproc):
                measured = json.loads((work / f"{method}-{rank}.json").read_text())
                rows.append({"method": method, "rank": rank, **measured})
    gib = 2**30
    fp32_shard = parameters * 4 / args.nproc
    kind = f"Qwen3-MoE ({args.experts} experts)" if args.experts else "Llama"
    print(f"random {kind} {parameters / 1e6:.0f} M parameters, files {args.dtype}, {args.nproc} processes; "
          f"fp32 shard per rank {fp32_shard / gib:.2f} GiB, whole fp32 model {parameters * 4 / gib:.2f} GiB")
    print(f"{'method':>10} {'rank':>4} {'seconds':>8} {'peak growth GiB':>15} {'held after GiB':>14} {'checksum':>14}")
    for r in rows:
        print(f"{r['method']:>10} {r['rank']:>4} {r['seconds']:8.2f} {r['grown'] / gib:15.2f} {r['after'] / gib:14.2f} "
              f"{r['checksum']:14.6e}")
    result = {"parameters": parameters, "experts": args.experts, "dtype": args.dtype, "nproc": args.nproc,
              "fp32_shard": fp32_shard, "rows": rows}
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
