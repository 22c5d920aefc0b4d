"""Chat backends for GSM-SEM's generator, judges and solvers, and the cache in front of them.

- `OpenAIBackend`: any OpenAI-compatible chat-completions endpoint (vLLM, SGLang, llama.cpp's server), through
  the official `openai` client; the API key is read from an environment variable, never a flag.
- `LocalBackend`: a causal LM loaded by `models.load` (`default`, a .gguf file, an HF directory), its chat
  template applied, sampled with `model.generate` under a per-call seed.
- `CachedBackend`: a SQLite table keyed on (backend kind, model, sha256 of the prompt text, sampling
  parameters, seed), so a replayed run asks the model nothing and returns the same text.

Seeds come from `derive_seed(run seed, item, mode, attempt, role)`: the same run replays exactly and a new run
seed gives fresh variants. A server honours `seed` per request (vLLM and llama.cpp do); greedy calls
(temperature 0) ignore it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Protocol

import torch

from ckaqad.errors import ConfigError, MissingDependencyError, ModelError
from ckaqad.models.load import load_model
from ckaqad.quant.apply import cached_quantized_weights

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters of one call (temperature 0: greedy)."""

    temperature: float = 0.8
    top_p: float = 0.95
    max_tokens: int = 256

    def __post_init__(self) -> None:
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.max_tokens < 1:
            raise ConfigError(f"sampling needs temperature >= 0, 0 < top_p <= 1 and max_tokens >= 1, got {self}")


def derive_seed(*parts: object) -> int:
    """A 31-bit seed from (run seed, item id, mode, attempt, role...): stable across processes and machines
    (sha256, not Python's salted hash)."""
    digest = hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class ChatBackend(Protocol):
    kind: str
    model: str

    def chat(self, messages: Messages, sampling: Sampling, seed: int) -> str:
        """The assistant's reply to `messages`."""
        ...


class OpenAIBackend:
    """An OpenAI-compatible chat endpoint at `url` (e.g. http://127.0.0.1:8000/v1) serving `model`."""

    kind = "openai"

    def __init__(self, url: str, model: str, api_key_env: str = "OPENAI_API_KEY", timeout: float = 120.0,
                 max_retries: int = 2) -> None:
        try:
            import openai
        except ImportError as exc:
            raise MissingDependencyError(f"the openai client is not installed (pip install openai): {exc}") from exc
        if not url.startswith(("http://", "https://")):
            raise ConfigError(f"--generator-url must be an http(s) URL, got {url!r}")
        self._openai = openai
        self.url, self.model = url.rstrip("/"), model
        # The openai client refuses an empty key; without one, send "EMPTY" (vLLM's value for keyless servers).
        self._client = openai.OpenAI(base_url=self.url, api_key=os.environ.get(api_key_env) or "EMPTY",
                                     timeout=timeout, max_retries=max_retries)

    def chat(self, messages: Messages, sampling: Sampling, seed: int) -> str:
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=messages, temperature=sampling.temperature, top_p=sampling.top_p,
                max_tokens=sampling.max_tokens, seed=seed)
        except self._openai.OpenAIError as exc:
            raise ModelError(f"chat endpoint {self.url} (model {self.model}): {exc}") from exc
        if not reply.choices:
            raise ModelError(f"chat endpoint {self.url} returned no choices")
        return reply.choices[0].message.content or ""


class LocalBackend:
    """A loaded causal LM answering chat messages through its tokenizer's chat template."""

    kind = "local"

    def __init__(self, model: torch.nn.Module, tokenizer, name: str) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ConfigError(f"local model {name} has no chat template; GSM-SEM's prompts are chat messages")
        self._model, self._tokenizer, self.model = model, tokenizer, name

    @classmethod
    def load(cls, spec: str, device: str | None = None) -> LocalBackend:
        loaded = load_model(spec, device=device)
        return cls(loaded.model, loaded.tokenizer, spec)

    def chat(self, messages: Messages, sampling: Sampling, seed: int) -> str:
        tok = self._tokenizer
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
        device = next(self._model.parameters()).device
        kwargs: dict = {"max_new_tokens": sampling.max_tokens, "pad_token_id": tok.pad_token_id,
                        "do_sample": sampling.temperature > 0}
        if sampling.temperature > 0:
            kwargs.update(temperature=sampling.temperature, top_p=sampling.top_p, top_k=0)
        devices = [device.index or 0] if device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), torch.no_grad(), cached_quantized_weights(self._model):
            torch.manual_seed(seed)
            out = self._model.generate(input_ids=ids.to(device), attention_mask=torch.ones_like(ids).to(device),
                                       **kwargs)
        return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


class ResponseCache:
    """SQLite store of replies by request key (one file, many runs may share it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path).expanduser()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._db = sqlite3.connect(self.path)
            self._db.execute("CREATE TABLE IF NOT EXISTS replies (key TEXT PRIMARY KEY, request TEXT, reply TEXT)")
            self._db.commit()
        except sqlite3.DatabaseError as exc:
            raise ConfigError(f"--cache {self.path} is not a usable SQLite file: {exc}") from exc
        self.hits = self.misses = 0

    @staticmethod
    def key(kind: str, model: str, messages: Messages, sampling: Sampling, seed: int) -> tuple[str, str]:
        prompt_hash = hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
        request = json.dumps({"backend": kind, "model": model, "prompt_sha256": prompt_hash,
                              "sampling": asdict(sampling), "seed": seed}, sort_keys=True)
        return hashlib.sha256(request.encode()).hexdigest(), request

    def get(self, key: str) -> str | None:
        row = self._db.execute("SELECT reply FROM replies WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def put(self, key: str, request: str, reply: str) -> None:
        self._db.execute("INSERT OR REPLACE INTO replies VALUES (?, ?, ?)", (key, request, reply))
        self._db.commit()

    def close(self) -> None:
        self._db.close()


class CachedBackend:
    """`backend` behind `cache`: a request seen before (same key) is answered from the cache."""

    def __init__(self, backend: ChatBackend, cache: ResponseCache) -> None:
        self.backend, self.cache = backend, cache
        self.kind, self.model = backend.kind, backend.model

    def chat(self, messages: Messages, sampling: Sampling, seed: int) -> str:
        key, request = ResponseCache.key(self.kind, self.model, messages, sampling, seed)
        reply = self.cache.get(key)
        if reply is not None:
            self.cache.hits += 1
            return reply
        self.cache.misses += 1
        reply = self.backend.chat(messages, sampling, seed)
        self.cache.put(key, request, reply)
        return reply


def make_backend(spec: str, url: str | None, api_key_env: str, device: str | None,
                 loaded: dict[str, LocalBackend] | None = None) -> ChatBackend:
    """`spec` served at `url` (an OpenAIBackend), or without `url` a local model spec (`default`, .gguf, HF
    directory), loaded once per spec when `loaded` is given (the generator may also be the judge)."""
    if url:
        return OpenAIBackend(url, spec, api_key_env)
    if loaded is not None and spec in loaded:
        return loaded[spec]
    backend = LocalBackend.load(spec, device)
    if loaded is not None:
        loaded[spec] = backend
    return backend
