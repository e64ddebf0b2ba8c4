"""A warm ``strata``: one Python process that has imported the CLI once and forks a child per
command, which runs ``cli.main.main(argv)`` exactly as ``python -m cli.main`` does (stdin,
stdout and stderr are files, the exit status is the command's, an uncaught exception prints
its traceback) — minus the interpreter start-up, which costs more than most commands.

The hardening tests run hundreds of commands (kill -9 loops, the hostile corpus); this keeps
them inside the CI budget.  A child is killed by its pid like any process.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent

_SERVER = r"""
import json, os, signal, sys, time, traceback
sys.path.insert(0, sys.argv[1])
import cli.main, cli.check, cli.commit, cli.mount, cli.registry, cli.transfer  # noqa
import imagestore.registry, imagestore.check, imagestore.archive  # noqa
import unionfs.mount, pyfuse3, trio, httpx  # noqa
proto_in = os.fdopen(os.dup(0), "rb", buffering=0)
proto_out = os.dup(1)
devnull = os.open(os.devnull, os.O_RDWR)
os.dup2(devnull, 0)
os.dup2(devnull, 1)

def reply(obj):
    os.write(proto_out, json.dumps(obj).encode() + b"\n")

def status_of(st):
    return -os.WTERMSIG(st) if os.WIFSIGNALED(st) else os.WEXITSTATUS(st)

done = {}

def reap(signum, frame):
    # children are reaped at once (no zombies: "is the daemon gone" checks must see them go)
    while True:
        try:
            pid, st = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        done[pid] = status_of(st)

signal.signal(signal.SIGCHLD, reap)

def child(req):
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    os.setpgid(0, 0)
    for fd, path, mode in ((0, req["in"] or os.devnull, os.O_RDONLY),
                           (1, req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC),
                           (2, req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)):
        f = os.open(path, mode, 0o644)
        os.dup2(f, fd)
        os.close(f)
    os.close(proto_out)
    os.environ.update(req["env"])
    for k in req["unset"]:
        os.environ.pop(k, None)
    if req["cwd"]:
        os.chdir(req["cwd"])
    try:
        rc = cli.main.main(req["argv"])
    except SystemExit as e:
        rc = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        rc = 1
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(rc)

while True:
    line = proto_in.readline()
    if not line:
        break
    req = json.loads(line)
    if req["op"] == "start":
        pid = os.fork()
        if pid == 0:
            child(req)
        reply({"pid": pid})
    elif req["op"] == "wait":
        deadline = time.monotonic() + req["timeout"]
        while req["pid"] not in done and time.monotonic() < deadline:
            time.sleep(0.002)
        reply({"status": done.pop(req["pid"], None)})
"""


@dataclass
class Run:
    pid: int
    out: Path
    err: Path
    started: float


@dataclass
class Result:
    returncode: int
    stdout: bytes
    stderr: bytes
    elapsed: float


class ForkServer:
    """The warm process; ``start``/``wait``/``kill`` commands through it."""

    def __init__(self, workdir: Path) -> None:
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen([sys.executable, "-c", _SERVER, str(REPO)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._n = 0

    def _ask(self, req: dict[str, Any]) -> dict[str, Any]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps(req).encode() + b"\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError("the fork server died")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def start(self, argv: list[str], input: bytes | None = None,
              env: dict[str, str] | None = None, unset: tuple[str, ...] = (),
              cwd: str | None = None) -> Run:
        self._n += 1
        base = self.dir / f"run{self._n}"
        src = None
        if input is not None:
            src = base.with_suffix(".in")
            src.write_bytes(input)
        out, err = base.with_suffix(".out"), base.with_suffix(".err")
        out.touch()
        err.touch()  # a child killed before it opens them still "wrote" nothing
        started = time.monotonic()
        pid = self._ask({"op": "start", "argv": argv, "in": str(src) if src else None,
                         "out": str(out), "err": str(err), "env": env or {},
                         "unset": list(unset), "cwd": cwd})["pid"]
        return Run(int(pid), out, err, started)

    def wait(self, run: Run, timeout: float = 300) -> Result:
        status = self._ask({"op": "wait", "pid": run.pid, "timeout": timeout})["status"]
        if status is None:
            self.kill(run)
            self._ask({"op": "wait", "pid": run.pid, "timeout": 30})
            raise AssertionError(f"command (pid {run.pid}) still running after {timeout}s")
        result = Result(int(status), run.out.read_bytes(), run.err.read_bytes(),
                        time.monotonic() - run.started)
        for p in (run.out, run.err, run.out.with_suffix(".in")):
            p.unlink(missing_ok=True)
        return result

    def kill(self, run: Run, sig: int = signal.SIGKILL) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(run.pid, sig)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


class Warm:
    """``Strata``'s interface (``strata(*args)``, ``strata.out``) through a ``ForkServer``,
    for one store root; ``start`` runs a command in the background (to kill it)."""

    def __init__(self, server: ForkServer, root: Path) -> None:
        self.server = server
        self.root = root

    def argv(self, args: tuple[str, ...]) -> list[str]:
        return ["--root", str(self.root), *args]

    def start(self, *args: str, input: bytes | None = None,
              env: dict[str, str] | None = None) -> Run:
        return self.server.start(self.argv(args), input, env)

    def __call__(self, *args: str, input: bytes | None = None, check: bool = True,
                 env: dict[str, str] | None = None, timeout: float = 300) -> Result:
        result = self.server.wait(self.start(*args, input=input, env=env), timeout)
        if check and result.returncode != 0:
            raise AssertionError(f"strata {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stderr.decode(errors='replace')}")
        return result

    def out(self, *args: str, **kw: Any) -> str:
        return self(*args, **kw).stdout.decode()


def record_path(root: Path, mountpoint: Path) -> Path:
    """Where the daemon records a mount (imagestore.containers: sha256 of the path)."""
    import hashlib

    key = hashlib.sha256(os.path.abspath(mountpoint).encode()).hexdigest()[:20]
    return root / "mounts" / f"{key}.json"


def mounted(path: Path) -> bool:
    full = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == full for line in f)


class WarmMount:
    """``strata mount -f`` (the daemon itself) through the fork server: returns once the
    mount answers and is recorded; ``close`` unmounts and waits for the daemon."""

    def __init__(self, warm: Warm, target: str, mountpoint: Path, *opts: str,
                 timeout: float = 30) -> None:
        self.warm, self.mountpoint = warm, mountpoint
        self.result: Result | None = None
        mountpoint.mkdir(parents=True, exist_ok=True)
        args = [a for o in opts for a in ("-o", o)]
        self.run = warm.start("mount", "-f", *args, target, str(mountpoint))
        record = record_path(warm.root, mountpoint)
        deadline = time.monotonic() + timeout
        while not (record.exists() and mounted(mountpoint)):
            if time.monotonic() > deadline:
                self.close()
                raise AssertionError(f"mount of {target} not ready in {timeout}s")
            status = warm.server._ask({"op": "wait", "pid": self.run.pid, "timeout": 0})
            if status["status"] is not None:
                raise AssertionError(f"mount of {target} failed: "
                                     f"{self.run.err.read_text(errors='replace')}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.run.pid

    def kill(self) -> Result:
        """SIGKILL the daemon: the mount stays, dead (ENOTCONN), for the test to clear."""
        self.warm.server.kill(self.run)
        self.result = self.warm.server.wait(self.run, 30)
        return self.result

    def close(self) -> Result:
        if self.result is not None:
            return self.result
        if mounted(self.mountpoint):
            proc = subprocess.run(["fusermount3", "-u", str(self.mountpoint)],
                                  capture_output=True)
            if proc.returncode != 0 and mounted(self.mountpoint):
                subprocess.run(["fusermount3", "-u", "-z", str(self.mountpoint)],
                               capture_output=True)
                self.warm.server.kill(self.run)
        self.result = self.warm.server.wait(self.run, 30)
        return self.result

    def __enter__(self) -> WarmMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
