"""The runtime spread of an export: reproducible for a seed, each variant what it claims to be, the spread its
definition, and an independent computation of the served model's numbers."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

from ckaqad.errors import ConfigError
from ckaqad.eval.runtime_spread import DEPLOYMENTS, METRICS, VARIANTS, runtime_spread, sample_blocks
from ckaqad.export.reader import load_served
from ckaqad.export.verify import kl_per_token
from ckaqad.export.writer import export_student

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "export"))
from export_helpers import VOCAB, make_student  # noqa: E402


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    from conftest import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("spread")
    export_student(make_student(), make_tiny_tokenizer(), root / "export")
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(3)
    teacher = transformers.LlamaForCausalLM(config).eval()
    heldout = torch.randint(0, VOCAB, (10, 24), generator=torch.Generator().manual_seed(4))
    return root / "export", teacher, heldout


def test_the_same_seed_gives_the_same_spread_and_another_seed_other_blocks(exported):
    export_dir, teacher, heldout = exported
    first = runtime_spread(export_dir, teacher, heldout, n_blocks=4, batch_size=2, seed=0)
    again = runtime_spread(export_dir, teacher, heldout, n_blocks=4, batch_size=2, seed=0)
    other = runtime_spread(export_dir, teacher, heldout, n_blocks=4, batch_size=2, seed=1)
    assert first == again
    assert other["variants"]["served"] != first["variants"]["served"]
    assert set(first["variants"]) == set(VARIANTS) and first["blocks"] == 4 and first["tokens"] == 4 * 24
    assert not torch.equal(sample_blocks(heldout, 4, 0), sample_blocks(heldout, 4, 1))


def test_variants_and_spread_are_what_they_say(exported):
    export_dir, teacher, heldout = exported
    result = runtime_spread(export_dir, teacher, heldout, n_blocks=6, batch_size=3, seed=2)
    variants = result["variants"]
    assert variants["served"]["kl_served"] == 0.0
    # The emulation in fp32 (what training measured) is not what is served for W4A4.
    assert variants["emulated"]["kl_served"] > 0
    for metric in METRICS:
        values = [variants[name][metric] for name in DEPLOYMENTS]
        s = result["spread"][metric]
        assert s["min"] == min(values) and s["max"] == max(values) and s["range"] == max(values) - min(values)
    # The served model's numbers, computed directly from transformers' logits on the same sampled blocks.
    blocks = sample_blocks(heldout, 6, 2)
    served, _ = load_served(export_dir)
    with torch.no_grad():
        s_logits = served(input_ids=blocks).logits.float()
        t_logits = teacher(input_ids=blocks).logits.float()
    assert variants["served"]["kl_teacher"] == pytest.approx(kl_per_token(t_logits, s_logits).mean().item(), rel=1e-9)
    nll = -torch.log_softmax(s_logits[:, :-1].double(), -1).gather(-1, blocks[:, 1:, None]).mean().item()
    assert variants["served"]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-9)
    agree = (s_logits.argmax(-1) == t_logits.argmax(-1)).float().mean().item()
    assert variants["served"]["top1_agreement"] == pytest.approx(agree)


def test_sample_blocks_checks_its_count():
    with pytest.raises(ConfigError, match="at least one block"):
        sample_blocks(torch.zeros(3, 8, dtype=torch.long), 0, 0)
    assert sample_blocks(torch.arange(24).reshape(3, 8), 10, 0).shape == (3, 8)
