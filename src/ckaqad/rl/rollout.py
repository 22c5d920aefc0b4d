"""Rollouts on CPU or GPU with `transformers`' `generate`: left-padded prompts, sampled (or greedy)
completions that end at the first EOS, and the per-token log-probabilities and entropies of a policy on them.

The sampling distribution is the model's softmax at `temperature`, with no top-k / top-p truncation, so that
the log-probabilities computed afterwards (`token_logprobs`, same temperature) are those of the policy that
sampled: the GRPO ratio r = π_θ / π_old needs exactly that.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass
class Rollout:
    """`input_ids` = left-padded prompts then completions (batch, P + T); `attention_mask` the same shape;
    `completion_mask` (batch, T): the completion's tokens up to and including its first EOS;
    `prompt_len` = P. Rows are ordered group by group (the completions of one prompt are consecutive)."""

    input_ids: Tensor
    attention_mask: Tensor
    completion_mask: Tensor
    prompt_len: int

    @property
    def completion_ids(self) -> Tensor:
        return self.input_ids[:, self.prompt_len:]

    @property
    def lengths(self) -> Tensor:
        return self.completion_mask.sum(dim=1)

    def rows(self, index: slice) -> Rollout:
        """The rollout of a slice of its rows (a minibatch)."""
        return Rollout(input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                       completion_mask=self.completion_mask[index], prompt_len=self.prompt_len)


def pad_token_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def left_pad(prompts: list[list[int]], pad_id: int, device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(map(len, prompts))
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
        mask[row, width - len(prompt):] = 1
    return ids.to(device), mask.to(device)


def completion_mask_of(completions: Tensor, eos_id: int | None) -> Tensor:
    """1 for each token up to and including the first EOS of its row (all tokens of a row without one)."""
    if eos_id is None:
        return torch.ones_like(completions)
    is_eos = (completions == eos_id).long()
    before_or_at_first = (is_eos.cumsum(dim=1) - is_eos) == 0
    return before_or_at_first.long()


@torch.no_grad()
def generate(model: nn.Module, tokenizer, prompts: list[list[int]], max_new_tokens: int, temperature: float,
             greedy: bool = False) -> Rollout:
    """One completion per prompt (repeat a prompt for a group). Sampling uses the global torch RNG, which the
    checkpoints save, so a resumed run samples what the uninterrupted one would have."""
    device = next(model.parameters()).device
    pad_id = pad_token_id(tokenizer)
    ids, mask = left_pad(prompts, pad_id, device)
    sampling = {"do_sample": False} if greedy else {"do_sample": True, "temperature": temperature, "top_k": 0,
                                                    "top_p": 1.0}
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                         eos_token_id=tokenizer.eos_token_id, **sampling)
    completions = out[:, ids.shape[1]:]
    completion_mask = completion_mask_of(completions, tokenizer.eos_token_id)
    return Rollout(input_ids=out, attention_mask=torch.cat([mask, completion_mask], dim=1),
                   completion_mask=completion_mask, prompt_len=ids.shape[1])


def position_ids(attention_mask: Tensor) -> Tensor:
    """Positions counted from each row's first real token, as `generate` counts them for left-padded rows."""
    positions = attention_mask.long().cumsum(dim=-1) - 1
    return positions.masked_fill(attention_mask == 0, 1)


def completion_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0) -> Tensor:
    """log π(· | prefix) over the vocabulary at each completion position (batch, T, vocab), FP32, at
    `temperature`. Only the completion's logits are computed (`logits_to_keep`)."""
    steps = rollout.completion_ids.shape[1]
    logits = model(input_ids=rollout.input_ids, attention_mask=rollout.attention_mask,
                   position_ids=position_ids(rollout.attention_mask),
                   logits_to_keep=steps + 1).logits[:, :-1].float() / temperature
    return logits.log_softmax(dim=-1)


def token_logprobs(model: nn.Module, rollout: Rollout, temperature: float = 1.0,
                   with_entropy: bool = False) -> tuple[Tensor, Tensor | None]:
    """(log π(token) of each completion token (batch, T), its distribution's entropy or None)."""
    logp = completion_logprobs(model, rollout, temperature)
    chosen = logp.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(dim=-1) if with_entropy else None
    return chosen, entropy


def decode_completions(tokenizer, rollout: Rollout) -> list[str]:
    """The completions as text, each cut at its first EOS, special tokens dropped."""
    rows = rollout.completion_ids.tolist()
    lengths = rollout.lengths.tolist()
    return [tokenizer.decode(row[:n], skip_special_tokens=True) for row, n in zip(rows, lengths, strict=True)]
