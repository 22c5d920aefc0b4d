"""The HumanEval sandbox: time limits, process group kill, scratch directory, no process creation, no
writes outside the scratch directory, no network, a minimal environment, rlimits."""

from __future__ import annotations

import socket
import tempfile
import time

import pytest

from ckaqad.errors import ConfigError
from ckaqad.eval.humaneval.problems import load_problems
from ckaqad.eval.humaneval.sandbox import CHILD, check_completion
from ckaqad.eval.humaneval.score import evaluate_execution


@pytest.fixture(scope="module")
def problems():
    return load_problems()


@pytest.fixture(scope="module")
def add_problem(problems):
    """HumanEval/53: ``add(x: int, y: int)``. Hostile completions end in ``return x + y`` so that they
    would PASS if their side effect (fork, write, connect) had been allowed."""
    problem = problems[53]
    assert problem["task_id"] == "HumanEval/53" and problem["entry_point"] == "add"
    return problem



def test_infinite_loops_are_killed_by_the_time_limit(add_problem):
    busy = "    while True:\n        pass\n"
    sleepy = "    import time\n    while True:\n        time.sleep(10)\n"
    stubborn = (
        "    while True:\n"
        "        try:\n"
        "            while True:\n"
        "                pass\n"
        "        except BaseException:\n"
        "            pass\n"
    )
    rows = [{"task_id": add_problem["task_id"], "completion": c} for c in (busy, sleepy, stubborn)]
    start = time.monotonic()
    result = evaluate_execution([add_problem], rows, timeout=1.0, workers=3)
    elapsed = time.monotonic() - start
    assert result["per_problem"][0]["results"] == ["timed out"] * 3
    assert result["pass@1"] == 0.0
    assert elapsed < 1.0 + 4.0

    start = time.monotonic()
    single = check_completion(add_problem, busy, timeout=0.5)
    assert time.monotonic() - start < 0.5 + 3.0
    assert single == {"task_id": add_problem["task_id"], "passed": False, "result": "timed out"}


def test_guard_lets_a_correct_completion_use_its_scratch_dir(add_problem, tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where check_completion makes its workdir
    completion = (
        "    with open('note.txt', 'w') as f:\n"
        "        f.write(str(x + y))\n"
        "    with open('note.txt') as f:\n"
        "        return int(f.read())\n"
    )
    result = check_completion(add_problem, completion, timeout=10.0)
    assert result == {"task_id": add_problem["task_id"], "passed": True, "result": "passed"}
    assert list(tmp_path.iterdir()) == []  # the scratch dir is gone


@pytest.mark.parametrize(
    "body",
    [
        "    import os\n    for _ in range(3):\n        os.fork()\n",
        "    import os\n    pid = os.fork()\n    if pid == 0:\n        os._exit(0)\n    os.waitpid(pid, 0)\n",
        "    import subprocess\n    subprocess.run(['true'])\n",
        "    import multiprocessing\n    p = multiprocessing.Process(target=abs, args=(1,))\n    p.start()\n"
        "    p.join()\n",
        "    import ctypes\n    ctypes.CDLL(None).getpid()\n",
        "    import os\n    os.system('true')\n",
    ],
    ids=["fork-loop", "fork-once", "subprocess", "multiprocessing", "ctypes", "os.system"],
)
def test_process_creation_is_refused(add_problem, body):
    result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
    assert result["passed"] is False
    assert result["result"].startswith("failed: ")


@pytest.mark.parametrize(
    "template",
    [
        "    open({path!r}, 'w').write('x')\n",
        "    open({path!r}, 'a').write('x')\n",
        "    import pathlib\n    pathlib.Path({path!r}).write_text('x')\n",
        "    import os\n    os.close(os.open({path!r}, os.O_CREAT | os.O_WRONLY))\n",
        "    import io\n    io.FileIO({path!r}, 'w').close()\n",
        "    import shutil\n    shutil.copyfile({src!r}, {path!r})\n",
    ],
    ids=["open-w", "open-a", "pathlib", "os.open", "FileIO", "shutil.copyfile"],
)
def test_writing_outside_the_scratch_dir_is_refused(add_problem, tmp_path, template):
    target = tmp_path / "escaped.txt"
    source = tmp_path / "source.txt"
    source.write_text("hello")
    body = template.format(path=str(target), src=str(source))
    result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
    assert result["passed"] is False
    assert "PermissionError" in result["result"]
    assert not target.exists()


def test_sockets_are_refused_and_nothing_connects(add_problem):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    try:
        for body in (
            f"    import socket\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n",
            f"    import socket\n    s = socket.socket()\n    s.connect(('127.0.0.1', {port}))\n",
            f"    import urllib.request\n    urllib.request.urlopen('http://127.0.0.1:{port}/', timeout=2)\n",
        ):
            result = check_completion(add_problem, body + "    return x + y\n", timeout=10.0)
            assert result["passed"] is False
            assert "network access is disabled" in result["result"]
        server.settimeout(0.2)
        with pytest.raises(TimeoutError):
            server.accept()  # no connection ever reached the listening socket
    finally:
        server.close()


def test_environment_is_minimal_and_limits_apply(add_problem, monkeypatch):
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.invalid:3128")
    monkeypatch.setenv("CKAQAD_SECRET_TOKEN", "hunter2")
    env_check = (
        "    import os\n"
        "    if os.environ.get('no_proxy') != '*' or 'HTTP_PROXY' in os.environ:\n"
        "        return None\n"
        "    if 'CKAQAD_SECRET_TOKEN' in os.environ:\n"
        "        return None\n"
        "    return x + y\n"
    )
    assert check_completion(add_problem, env_check, timeout=10.0)["passed"] is True

    hog = "    blob = bytearray(1024 * 1024 * 1024)\n    return x + y\n"
    result = check_completion(add_problem, hog, timeout=10.0, memory_mb=256)
    assert result["passed"] is False and "MemoryError" in result["result"]

    quitter = "    import sys\n    sys.exit(0)\n"
    assert check_completion(add_problem, quitter, timeout=10.0)["result"] == "failed: SystemExit: 0"
    hard_quitter = "    import os\n    os._exit(0)\n"
    assert check_completion(add_problem, hard_quitter, timeout=10.0)["passed"] is False

    with pytest.raises(ConfigError):
        check_completion(add_problem, "    return x + y\n", timeout=0)


def test_the_child_is_a_real_file_that_does_nothing_when_imported():
    import runpy

    assert CHILD.is_file() and CHILD.suffix == ".py"
    namespace = runpy.run_path(str(CHILD), run_name="not_main")  # no guard installed, nothing executed
    assert callable(namespace["main"])
    assert socket.socket.__name__ == "socket"  # the parent's socket module is untouched
