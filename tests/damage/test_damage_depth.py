"""Depth pruning: the removed model equals the teacher run with those blocks skipped (also after a save and
reload), the kept-block layer map pairs each student block with the teacher block it was, block influence
matches its definition, and bad block lists are refused."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from ckaqad.capture import LayerMap
from ckaqad.damage.depth import (
    block_influence,
    block_removal_kl,
    drop_blocks_,
    kept_layer_map,
    least_important,
    parse_block_list,
    skip_blocks,
)
from ckaqad.errors import ConfigError
from ckaqad.eval.fidelity import measure_fidelity
from ckaqad.models.arch import decoder_layers, num_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def four_block_model(seed: int = 0):
    config = transformers.LlamaConfig(vocab_size=259, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).float().eval()


def batches(n: int = 2, seq: int = 24):
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 256, (2, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    return out


def test_dropped_model_equals_the_teacher_skipping_those_blocks(tmp_path):
    teacher = four_block_model()
    student = copy.deepcopy(teacher)
    kept = drop_blocks_(student, [1, 2])
    assert kept == [0, 3] and num_layers(student) == 2 and student.config.num_hidden_layers == 2
    assert [b.self_attn.layer_idx for b in decoder_layers(student)] == [0, 1]
    batch = batches(1)[0]
    with torch.no_grad(), skip_blocks(teacher, [1, 2]):
        skipped = teacher(**batch).logits
    with torch.no_grad():
        assert torch.equal(student(**batch).logits, skipped)
        assert not torch.allclose(teacher(**batch).logits, skipped)  # the hooks are gone again
    student.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, skipped, rtol=0, atol=0)
    # Generation uses the KV cache, indexed by the renumbered layer_idx.
    out = reloaded.generate(batch["input_ids"][:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


def test_kept_layer_map_pairs_the_right_blocks():
    teacher = four_block_model()
    student = copy.deepcopy(teacher)
    kept = drop_blocks_(student, [2])
    spec = kept_layer_map(kept)
    assert spec == "0:0,1:1,2:3"
    right = LayerMap.parse(spec, 3, 4)
    results, _ = measure_fidelity(teacher, {"s": student}, batches(), layer_map=right, progress=False)
    layers = {row["index"]: row for row in results["s"].layers}
    # Before the removed block the states are the teacher's own: CKA exactly 1 with the right pairing ...
    assert layers[0]["cka"] == pytest.approx(1.0, abs=1e-6) and layers[1]["cka"] == pytest.approx(1.0, abs=1e-6)
    assert layers[2]["teacher_index"] == 3
    # ... while the proportional map pairs student block 1 with teacher block 2, which it is not.
    proportional = LayerMap.parse("proportional", 3, 4)
    assert dict(proportional.pairs)[1] == 2
    wrong, _ = measure_fidelity(teacher, {"s": student}, batches(), layer_map=proportional, progress=False)
    assert wrong["s"].layers[1]["cka"] < 1 - 1e-4


def test_block_influence_is_one_minus_the_mean_cosine_of_block_input_and_output():
    model = four_block_model()
    data = batches()
    scores = block_influence(model, data, n_sink=1)
    ins, outs = {}, {}
    blocks = decoder_layers(model)
    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: ins.setdefault(i, []).append(a[0]),
                                                       with_kwargs=True))
        handles.append(block.register_forward_hook(lambda m, a, o, i=i: outs.setdefault(i, []).append(
            o[0] if isinstance(o, tuple) else o)))
    with torch.no_grad():
        for batch in data:
            model(**batch)
    for h in handles:
        h.remove()
    for i in range(4):
        x = torch.cat([t[:, 1:] for t in ins[i]]).reshape(-1, 64)
        y = torch.cat([t[:, 1:] for t in outs[i]]).reshape(-1, 64)
        direct = 1 - torch.nn.functional.cosine_similarity(x, y, dim=-1).mean()
        assert scores[i] == pytest.approx(float(direct), abs=1e-5)


def test_removal_kl_is_zero_for_an_identity_block_and_least_important_picks_it():
    model = four_block_model()
    with torch.no_grad():  # block 2 adds nothing to the residual stream: it is an identity
        decoder_layers(model)[2].self_attn.o_proj.weight.zero_()
        decoder_layers(model)[2].mlp.down_proj.weight.zero_()
    kl = block_removal_kl(model, batches())
    assert kl[2] == pytest.approx(0.0, abs=1e-6) and min(kl[i] for i in (0, 1, 3)) > 1e-4
    assert least_important(kl, 1) == [2]
    assert block_influence(model, batches())[2] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(("spec", "message"), [("4", "out of range"), ("0-3", "every one"), ("2-1", "backwards"),
                                               ("a", "list like"), ("-5", "out of range")])
def test_bad_block_lists(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_block_list(spec, 4)


def test_block_list_forms():
    assert parse_block_list("3,1,1-2", 6) == [1, 2, 3]
    assert parse_block_list("-1", 6) == [5]
