"""tests for ckaqad/eval/gsm_sem/backends.py: the OpenAI-compatible backend against a loopback chat-completions
server, the SQLite cache, seeds, and the local backend on a tiny model."""

from __future__ import annotations

import pytest

from ckaqad.errors import ConfigError, ModelError
from ckaqad.eval.gsm_sem.backends import (
    CachedBackend,
    LocalBackend,
    OpenAIBackend,
    ResponseCache,
    Sampling,
    derive_seed,
)
from tests.eval.gsm_sem_helpers import chat_server

HELLO = [{"role": "user", "content": "hello"}]


def test_openai_backend_speaks_chat_completions(monkeypatch):
    monkeypatch.setenv("MY_KEY", "sk-test")
    with chat_server(lambda body: f"echo {body['messages'][0]['content']}") as (url, received):
        backend = OpenAIBackend(url, "served-model", api_key_env="MY_KEY", max_retries=0)
        assert backend.chat(HELLO, Sampling(temperature=0.5, top_p=0.9, max_tokens=7), seed=42) == "echo hello"
    body = received[0]
    assert body["model"] == "served-model" and body["messages"] == HELLO and body["seed"] == 42
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.5, 0.9, 7)
    assert body["authorization"] == "Bearer sk-test"


def test_openai_backend_errors_are_model_errors():
    with chat_server(lambda body: "", status=500) as (url, _):
        with pytest.raises(ModelError, match="chat endpoint"):
            OpenAIBackend(url, "m", max_retries=0).chat(HELLO, Sampling(), 0)
    with pytest.raises(ConfigError, match="http"):
        OpenAIBackend("127.0.0.1:1", "m")


def test_cache_answers_a_repeated_request_without_the_server(tmp_path):
    with chat_server(lambda body: f"reply {len(body['messages'])} {body['seed']}") as (url, received):
        cache = ResponseCache(tmp_path / "cache.sqlite")
        backend = CachedBackend(OpenAIBackend(url, "m", max_retries=0), cache)
        first = backend.chat(HELLO, Sampling(), 1)
        assert backend.chat(HELLO, Sampling(), 1) == first and len(received) == 1
        backend.chat(HELLO, Sampling(), 2)  # another seed
        backend.chat(HELLO, Sampling(temperature=0.1), 1)  # other sampling
        backend.chat([{"role": "user", "content": "hello!"}], Sampling(), 1)  # other prompt
        assert len(received) == 4 and (cache.hits, cache.misses) == (1, 4)
        cache.close()
        # a new process (a new cache object on the same file) replays without asking
        again = CachedBackend(OpenAIBackend(url, "m", max_retries=0), ResponseCache(tmp_path / "cache.sqlite"))
        assert again.chat(HELLO, Sampling(), 1) == first and len(received) == 4
        other_model = CachedBackend(OpenAIBackend(url, "m2", max_retries=0), ResponseCache(tmp_path / "cache.sqlite"))
        other_model.chat(HELLO, Sampling(), 1)
        assert len(received) == 5


def test_cache_file_that_is_not_sqlite(tmp_path):
    bad = tmp_path / "c.sqlite"
    bad.write_text("not a database " * 100)
    with pytest.raises(ConfigError, match="SQLite"):
        ResponseCache(bad)


def test_seeds_are_stable_and_distinct():
    assert derive_seed(0, "gsm8k-1", "facts", 0, "generate") == derive_seed(0, "gsm8k-1", "facts", 0, "generate")
    seeds = {derive_seed(run, item, mode, attempt) for run in (0, 1) for item in ("a", "b")
             for mode in ("facts", "entity") for attempt in range(3)}
    assert len(seeds) == 24 and all(0 <= s < 2**31 for s in seeds)
    # the same number in every process and on every machine (sha256, not the salted hash()): a replay's key
    assert derive_seed(0, "gsm8k-0", "facts", 0, "generate") == 624134776


def test_sampling_is_checked():
    with pytest.raises(ConfigError):
        Sampling(temperature=-1)
    with pytest.raises(ConfigError):
        Sampling(top_p=0)


def test_local_backend_seeded_replay(tiny_model, tiny_tokenizer):
    tiny_tokenizer.chat_template = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                                    "{% if add_generation_prompt %}assistant:{% endif %}")
    backend = LocalBackend(tiny_model, tiny_tokenizer, "tiny")
    sampling = Sampling(temperature=1.0, top_p=1.0, max_tokens=12)
    a, b, c = (backend.chat(HELLO, sampling, s) for s in (3, 3, 4))
    assert a == b and a != c
    greedy = Sampling(temperature=0.0, max_tokens=12)
    assert backend.chat(HELLO, greedy, 1) == backend.chat(HELLO, greedy, 2)


def test_local_backend_needs_a_chat_template(tiny_model, tiny_tokenizer):
    with pytest.raises(ConfigError, match="chat template"):
        LocalBackend(tiny_model, tiny_tokenizer, "tiny")
