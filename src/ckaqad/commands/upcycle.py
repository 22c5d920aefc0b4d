"""`ckaqad upcycle`: a realistic Mixture-of-Experts teacher, offline, from the embedded SmolLM2-135M (or any
Llama-style teacher) by sparse upcycling (`models.upcycle`), optionally trained with next-token CE on the
built-in corpus so that routing matters, written as an ordinary HF directory (`--teacher DIR` for every other
command). It measures whether routing matters before and after the CE steps: the held-out KL between the
model and the same model with every router's experts relabelled by a cyclic shift (the tokens then reach
other experts; the KL is 0 when the experts are interchangeable), with the top-k Jaccard of that pair, and
the perplexity next to the dense model's (docs/moe_export.md#the-upcycled-model). Writes `upcycle.json`
beside the model.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from ckaqad.capture import router_modules
from ckaqad.data.blocks import DataConfig, eval_batches, load_blocks, train_batches
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.files import atomic_directory, check_writable, write_json
from ckaqad.models.load import load_model
from ckaqad.models.upcycle import UpcycleConfig, upcycle
from ckaqad.objectives.ce import next_token_nll
from ckaqad.train.schedule import warmup_cosine

HELP = "a Mixture-of-Experts teacher from a dense one by sparse upcycling (+ optional CE training)"


@dataclass
class Config:
    teacher: str = "default"
    """dense Llama-style model to upcycle: default (embedded SmolLM2-135M-Instruct) or an HF directory"""
    out: str = "runs/smollm2-moe-upcycled"
    """output HF directory of the MoE model (and upcycle.json)"""
    upcycle: UpcycleConfig = field(default_factory=UpcycleConfig)
    ce_steps: int = 0
    """next-token CE steps on the training blocks after upcycling (experts and routers train, the rest is frozen)"""
    ce_lr: float = 1e-4
    """peak learning rate of the CE steps (AdamW, warmup then cosine)"""
    ce_batch_size: int = 4
    """blocks per CE step"""
    eval_blocks: int = 16
    """held-out blocks for the routing-sensitivity and perplexity measurements"""
    data: DataConfig = field(default_factory=lambda: DataConfig(seq_len=128))
    device: str | None = None
    """cpu or cuda (default: cuda when available)"""

    def __post_init__(self) -> None:
        if self.ce_steps < 0 or self.ce_lr <= 0 or self.ce_batch_size < 1 or self.eval_blocks < 1:
            raise ConfigError("--ce-steps must be >= 0, --ce-lr > 0, --ce-batch-size and --eval-blocks >= 1")


@torch.no_grad()
def shifted_routers(model: nn.Module) -> nn.Module:
    """A copy of the MoE `model` whose every router sends each token to the next experts (row e of the router
    weight becomes row e+1 mod E): the same routing decisions, other experts."""
    shifted = copy.deepcopy(model)
    for router in router_modules(shifted).values():
        router.weight.copy_(router.weight.roll(1, dims=0))
    return shifted


def routing_sensitivity(model: nn.Module, blocks: torch.Tensor, batch_size: int, limit: int) -> dict:
    """How much the experts' identity matters: held-out KL(model ‖ model with shifted routers) per token, the top-k
    Jaccard between the two (≈ 0 when every expert moved), and the model's perplexity."""
    device = next(model.parameters()).device
    results, teacher_stats = measure_fidelity(model, {"shifted": shifted_routers(model)},
                                              eval_batches(blocks, batch_size, device, limit=limit), progress=False)
    r = results["shifted"]
    return {"kl_per_token_shifted_routing": r.kl_per_token, "top1_agreement_shifted_routing": r.top1_agreement,
            "router_jaccard_shifted_routing": r.router_jaccard, "perplexity": teacher_stats["perplexity"]}


def perplexity(model: nn.Module, blocks: torch.Tensor, batch_size: int, limit: int) -> float:
    device = next(model.parameters()).device
    nll_sum, count_sum = 0.0, 0
    with torch.no_grad():
        for batch in eval_batches(blocks, batch_size, device, limit=limit):
            nll, count = next_token_nll(model(**batch).logits, batch["input_ids"], batch["attention_mask"])
            nll_sum, count_sum = nll_sum + float(nll), count_sum + count
    return math.exp(nll_sum / max(count_sum, 1))


def train_ce(model: nn.Module, blocks: torch.Tensor, config: Config) -> list[float]:
    """`config.ce_steps` AdamW steps of next-token CE on the training blocks; only the experts and the routers
    train (the attention, norms and embeddings stay the dense model's). Returns the loss of each step."""
    trainable = [p for name, p in model.named_parameters() if ".mlp." in name]
    model.requires_grad_(False)
    for p in trainable:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(trainable, lr=config.ce_lr, weight_decay=0.0, betas=(0.9, 0.95), foreach=False)
    factor = warmup_cosine(config.ce_steps, max(config.ce_steps // 10, 1), 0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    device = next(model.parameters()).device
    batches = train_batches(blocks, config.ce_batch_size, seed=config.upcycle.seed, device=device)
    losses = []
    model.train()
    for step in range(config.ce_steps):
        batch = next(batches)
        nll, count = next_token_nll(model(**batch).logits, batch["input_ids"], batch["attention_mask"])
        loss = nll / max(count, 1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule.step()
        losses.append(float(loss.detach()))
        print(f"CE step {step + 1}/{config.ce_steps}: loss {losses[-1]:.4f}", flush=True)
    model.eval().requires_grad_(False)
    return losses


def run(config: Config) -> dict:
    out = check_writable(config.out)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"--out {out} exists and is not empty; choose another directory")
    started = time.perf_counter()
    dense = load_model(config.teacher, device=config.device, dtype=torch.float32)
    blocks = load_blocks(config.data, dense.model, dense.tokenizer)
    device = next(dense.model.parameters()).device
    size = (config.ce_batch_size, config.eval_blocks)
    record: dict = {"config": asdict(config), "data": blocks.describe(),
                    "dense_perplexity": perplexity(dense.model, blocks.heldout, *size)}
    model = upcycle(dense.model, config.upcycle).to(device)
    del dense.model
    record["upcycled"] = routing_sensitivity(model, blocks.heldout, *size)
    print(f"upcycled: ppl {record['upcycled']['perplexity']:.3f} (dense {record['dense_perplexity']:.3f}); "
          f"KL to shifted routing {record['upcycled']['kl_per_token_shifted_routing']:.5f}", flush=True)
    if config.ce_steps:
        record["ce_losses"] = train_ce(model, blocks.train, config)
        record["after_ce"] = routing_sensitivity(model, blocks.heldout, *size)
        print(f"after {config.ce_steps} CE steps: ppl {record['after_ce']['perplexity']:.3f}; KL to shifted routing "
              f"{record['after_ce']['kl_per_token_shifted_routing']:.5f}", flush=True)
    record["parameters"] = sum(p.numel() for p in model.parameters())
    record["runtime_s"] = time.perf_counter() - started
    with atomic_directory(out) as tmp:
        model.to(torch.bfloat16).save_pretrained(str(tmp))  # a deployed teacher is bf16
        dense.tokenizer.save_pretrained(str(tmp))
        write_json(Path(tmp) / "upcycle.json", record, sort_keys=True)
    print(f"wrote {out} ({record['parameters']:,} parameters, {record['runtime_s']:.0f} s)")
    return record
