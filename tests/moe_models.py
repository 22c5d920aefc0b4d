"""Tiny random MoE and hybrid models from transformers' own config classes (hidden 64, 8 experts, top-2,
2–4 blocks, vocabulary 259 = the tiny byte tokenizer's), float32, eval mode, deterministic per seed."""

from __future__ import annotations

import torch

VOCAB = 259
FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "nemotron_h")


def tiny_moe_config(family: str):
    import transformers as T

    common = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 4, "max_position_embeddings": 128,
              "tie_word_embeddings": False}
    if family == "qwen3_moe":
        return T.Qwen3MoeConfig(**common, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=2,
                                num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2)
    if family == "mixtral":
        return T.MixtralConfig(**common, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                               head_dim=16, num_local_experts=8, num_experts_per_tok=2)
    if family == "gpt_oss":
        return T.GptOssConfig(**common, intermediate_size=32, num_hidden_layers=2, num_key_value_heads=2,
                              head_dim=16, num_local_experts=8, num_experts_per_tok=2,
                              layer_types=["full_attention"] * 2)
    if family == "deepseek_v3":
        return T.DeepseekV3Config(**common, intermediate_size=64, moe_intermediate_size=32, num_hidden_layers=3,
                                  first_k_dense_replace=1, num_key_value_heads=4, n_routed_experts=8,
                                  num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
                                  q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                                  v_head_dim=16, rope_scaling=None)
    if family == "nemotron_h":
        return T.NemotronHConfig(**common, intermediate_size=64, moe_intermediate_size=32,
                                 moe_shared_expert_intermediate_size=32, num_key_value_heads=2, head_dim=16,
                                 n_routed_experts=8, num_experts_per_tok=2, n_group=1, topk_group=1,
                                 mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16, n_groups=1,
                                 chunk_size=16, hybrid_override_pattern="ME*E")
    raise ValueError(family)


def tiny_moe(family: str, seed: int = 0) -> torch.nn.Module:
    """A random tiny model of `family` with non-zero router weights (some families initialise them to 0)."""
    import transformers

    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(tiny_moe_config(family), dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate.weight", "router.weight")) or "experts" in name:
                p.normal_(0, 0.1)
    return model.eval()
