"""Rollouts: the log-probabilities the loop computes are the ones `generate` sampled from (left padding and
positions included), and completions end at their first EOS."""

from __future__ import annotations

import pytest
import torch

from ckaqad.rl.rollout import completion_mask_of, decode_completions, generate, left_pad, position_ids, token_logprobs

pytestmark = pytest.mark.usefixtures("one_thread")


def test_completion_mask_keeps_tokens_up_to_the_first_eos():
    completions = torch.tensor([[5, 6, 9, 7, 9], [9, 1, 1, 1, 1], [1, 2, 3, 4, 5]])
    assert completion_mask_of(completions, 9).tolist() == [[1, 1, 1, 0, 0], [1, 0, 0, 0, 0], [1, 1, 1, 1, 1]]
    assert completion_mask_of(completions, None).tolist() == [[1] * 5] * 3


def test_left_padding_and_positions():
    ids, mask = left_pad([[1, 2, 3], [4]], pad_id=0, device=torch.device("cpu"))
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert position_ids(mask)[1, 2].item() == 0 and position_ids(mask)[0].tolist() == [0, 1, 2]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_are_the_sampling_distributions(tiny_model, tiny_tokenizer, temperature):
    """generate's processed scores (temperature, no top-k) give the same log π(token) as token_logprobs,
    on prompts of different lengths (so rows are left-padded)."""
    prompts = [list(b"hello there"), list(b"hi"), list(b"a longer prompt here")]
    torch.manual_seed(0)
    rollout = generate(tiny_model, tiny_tokenizer, prompts, max_new_tokens=6, temperature=temperature)
    ids, mask = left_pad(prompts, tiny_tokenizer.pad_token_id, torch.device("cpu"))
    torch.manual_seed(0)
    again = tiny_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=True,
                                temperature=temperature, top_k=0, top_p=1.0, output_scores=True,
                                return_dict_in_generate=True, pad_token_id=tiny_tokenizer.pad_token_id,
                                eos_token_id=tiny_tokenizer.eos_token_id)
    assert torch.equal(again.sequences, rollout.input_ids)
    scores = torch.stack(again.scores, dim=1).log_softmax(-1)
    expected = scores.gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        got, entropy = token_logprobs(tiny_model, rollout, temperature, with_entropy=True)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    assert entropy.shape == got.shape and (entropy > 0).all()


def test_decoded_completions_stop_at_eos(tiny_model, tiny_tokenizer):
    rollout = generate(tiny_model, tiny_tokenizer, [list(b"ab")], max_new_tokens=4, temperature=1.0, greedy=True)
    rollout.input_ids[0, rollout.prompt_len + 1] = tiny_tokenizer.eos_token_id
    rollout.completion_mask[:] = completion_mask_of(rollout.completion_ids, tiny_tokenizer.eos_token_id)
    first = rollout.completion_ids[0, 0].item()
    assert decode_completions(tiny_tokenizer, rollout) == [tiny_tokenizer.decode([first], skip_special_tokens=True)]
