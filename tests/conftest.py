"""Shared fixtures: a tiny random Llama and a byte-level tokenizer, both built in-process (no downloads)."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import settings

# Property tests draw the same examples on every run (CI included), so a green run here is a green run there;
# `HYPOTHESIS_PROFILE=explore` draws new ones (what found the float32 CKA edge in tests/objectives).
settings.register_profile("ckaqad", derandomize=True, database=None)
settings.register_profile("explore", derandomize=False)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ckaqad"))
# The compiled CPU fake quant (formats/cpu_fused.py) costs a compile per function and process; the suite runs
# the references (bit-identical), and tests/formats/test_cpu_fused.py compiles each function once to prove it.
os.environ.setdefault("CKAQAD_CPU_FUSED", "0")

TINY_SPECIAL_TOKENS = ("<s>", "</s>", "<pad>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode character map (the ByteLevel alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def make_tiny_tokenizer():
    """Byte-level BPE with no merges: token id == byte value (0..255), then <s>=256, </s>=257, <pad>=258."""
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    byte_map = _bytes_to_unicode()
    vocab = {byte_map[b]: b for b in range(256)}
    for tok in TINY_SPECIAL_TOKENS:
        vocab[tok] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(TINY_SPECIAL_TOKENS))
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def make_tiny_model(seed: int = 0, vocab_size: int = 256 + len(TINY_SPECIAL_TOKENS)):
    """A random 2-layer Llama (hidden 64) in float32 eval mode, deterministic for a given seed."""
    import transformers

    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    return model.float().eval()


def save_tiny_teacher(directory) -> None:
    """A tiny random Llama and its tokenizer as an HF model directory (what `--teacher DIR` reads)."""
    make_tiny_model(seed=0).save_pretrained(directory)
    make_tiny_tokenizer().save_pretrained(directory)


@pytest.fixture(scope="module")
def one_thread():
    """The tiny models run fastest on one thread, and far faster than two when other processes share the cores.
    Modules that train use it with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_tokenizer():
    """Fresh byte-level tokenizer (259 tokens) for each test."""
    return make_tiny_tokenizer()


@pytest.fixture
def tiny_model():
    """Fresh seeded random tiny Llama for each test (tests may train or move it)."""
    return make_tiny_model(seed=0)


@pytest.fixture
def tiny_model_factory():
    """Callable seed -> new tiny Llama, for tests that need several independent copies."""
    return make_tiny_model
