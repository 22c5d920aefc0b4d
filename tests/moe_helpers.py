"""Tiny random Mixture-of-Experts and hybrid models from transformers' own config classes (hidden 64, 8
experts), shared by the MoE tests (quant/, models/, commands/, export/). Built in-process, no downloads."""

from __future__ import annotations

import torch
from conftest import TINY_SPECIAL_TOKENS

MOE_FAMILIES = ("qwen3_moe", "mixtral", "gpt_oss", "deepseek_v3", "nemotron_h")
# The dense family of the paper, built by the same helper for coverage comparisons.
FAMILIES = ("qwen3",) + MOE_FAMILIES
_COMMON = dict(vocab_size=256 + len(TINY_SPECIAL_TOKENS), hidden_size=64, num_attention_heads=4,
               num_key_value_heads=2, max_position_embeddings=512, bos_token_id=256, eos_token_id=257,
               pad_token_id=258, tie_word_embeddings=False)


def tiny_config(family: str, experts_implementation: str | None = None):
    """The config of a tiny random `family` model (8 experts, top-2, 2-4 blocks)."""
    import transformers

    if family == "qwen3":
        config = transformers.Qwen3Config(**_COMMON, intermediate_size=128, num_hidden_layers=2, head_dim=16)
    elif family == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(**_COMMON, intermediate_size=128, moe_intermediate_size=32,
                                             num_experts=8, num_experts_per_tok=2, num_hidden_layers=2,
                                             head_dim=16, decoder_sparse_step=1)
    elif family == "mixtral":
        config = transformers.MixtralConfig(**_COMMON, intermediate_size=32, num_local_experts=8,
                                            num_experts_per_tok=2, num_hidden_layers=2)
    elif family == "gpt_oss":
        config = transformers.GptOssConfig(**_COMMON, intermediate_size=32, num_local_experts=8,
                                           num_experts_per_tok=2, num_hidden_layers=2, head_dim=16,
                                           layer_types=["sliding_attention", "full_attention"])
    elif family == "deepseek_v3":
        config = transformers.DeepseekV3Config(
            **{**_COMMON, "num_key_value_heads": 4}, intermediate_size=128, moe_intermediate_size=32,
            n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, n_group=2, topk_group=1, num_hidden_layers=2, first_k_dense_replace=1,
            q_lora_rank=32, kv_lora_rank=32, qk_rope_head_dim=16, qk_nope_head_dim=16, v_head_dim=16)
    elif family == "nemotron_h":
        config = transformers.NemotronHConfig(
            **_COMMON, intermediate_size=128, moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
            n_shared_experts=1, moe_shared_expert_intermediate_size=32, n_group=1, topk_group=1,
            hybrid_override_pattern="ME*E", mamba_num_heads=4, mamba_head_dim=16, ssm_state_size=16,
            n_groups=1, mamba_chunk_size=16, head_dim=16)
    else:
        raise ValueError(family)
    if experts_implementation is not None:
        config._experts_implementation = experts_implementation
    return config


def make_tiny_moe(family: str, seed: int = 0, experts_implementation: str | None = None):
    """A random tiny `family` model in float32 eval mode, deterministic for a seed. Expert weights are drawn
    at a realistic scale (the config's init std), routers too, so routing spreads over the experts."""
    import transformers

    config = tiny_config(family, experts_implementation)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    return model.float().eval()
