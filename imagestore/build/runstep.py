"""RUN: a command in the stage's mount, through the OCI runtime as ``strata run`` runs one.

The command is the JSON form as written, or the shell form after the ``SHELL`` in force
(``/bin/sh -c`` by default); a RUN that is one heredoc runs its text through the shell.  It
sees the image config's Env, WorkingDir and User, plus the build arguments in force (declared
in the stage, with a value, not shadowed by an ENV; the predefined proxy variables too, without
a declaration), and the network ``--network`` or ``RUN --network`` asks for (``host`` by
default, as ``buildah bud``; ``none``).  History records it as docker's classic builder does:
``|2 A=1 B=2 /bin/sh -c make`` when build arguments are in force, so a changed argument
changes the step's cache key.

The runtime gets the same spec ``strata run`` writes (``runtime.spec``: namespaces,
capabilities, seccomp, /proc /dev /sys, /etc/hosts /etc/hostname /etc/resolv.conf bound from
files of the stage's directory) over the stage's mount.  The mount targets the rootfs lacks are
stubs in an *init layer* of the stage mount, right above the image's layers (as ``strata run``
and docker do it), so they never land in a step's layer.  Output lines go to the build's
progress as they come; a command that fails raises ``BuildStepFailed`` with its exit status
and the end of its output.

Seams: ``runner.run_bundle`` runs the bundle; ``runtime`` writes the spec; ``StageMount``
(``stage.py``) is the rootfs and turns the upper into the step's layer afterwards.

Caveats:
* ``RUN --mount`` and ``--security`` are refused by the front end (BuildKit features).
* The runtime runs in a worker thread: signals to the build are not passed on to the command
  (``strata run`` passes them on); Ctrl-C or SIGTERM kill the command and stop the build, and
  a build killed with SIGKILL has its command killed by the stage mount's daemon (``guard``).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING

from unionfs.resolve import UnionView

from ..errors import StoreError
from ..initlayer import write_stubs
from ..mounts import guard
from ..runner import OCIRuntime, RunResult, Streams, run_bundle
from ..runtime import Bind, RunOptions, capabilities, etc_files, spec, stub_targets
from ..runtime_seccomp import load
from ..runtime_user import RootView, resolve_user
from . import metadata, records
from .copy import DestRoot
from .dockerfile import Instruction
from .errors import BuildStepFailed
from .stage import PROXY_ARGS

if TYPE_CHECKING:
    from ..api import Store
    from ..images import Image
    from .stage import StageBuilder, StageMount

__all__ = ["BuildStepFailed", "run_step", "write_init"]

TAIL = 20  # output lines an error carries


def command(sb: StageBuilder, inst: Instruction) -> list[str]:
    shell = list(sb.cfg.get("Shell") or metadata.DEFAULT_SHELL)
    if inst.json:
        return list(inst.args)
    text = inst.args[0]
    if inst.heredocs:
        h = inst.heredocs[0]
        if text.strip() == f"<<{h.name}" or text.strip() == f"<<-{h.name}":
            text = h.content  # the heredoc is the script
        else:
            body = inst.original.split("\n", 1)[1] if "\n" in inst.original else ""
            text = text + "\n" + body
    return [*shell, text]


def build_env(sb: StageBuilder) -> tuple[dict[str, str], dict[str, str]]:
    """(the build arguments in force, the proxy variables given): what RUN sees beyond Env."""
    env_names = {str(e).partition("=")[0] for e in sb.cfg.get("Env") or []}
    args = {k: v for k, v in sb.args.items() if v is not None and k not in env_names
            and k not in PROXY_ARGS}
    proxies = {k: sb.b.build_args[k] for k in PROXY_ARGS if k in sb.b.build_args
               and k not in env_names}
    proxies.update({k: v for k, v in sb.args.items() if v is not None and k in PROXY_ARGS})
    return args, proxies


def run_step(sb: StageBuilder, inst: Instruction, where: str, step: int) -> bool:
    argv = command(sb, inst)
    network = inst.flag("network") or sb.b.network
    if network == "default":
        network = "host"
    if network not in ("host", "none"):
        raise StoreError(f"{where}: RUN --network={network}: host or none")
    args, proxies = build_env(sb)
    prefix = f"|{len(args)} " + "".join(f"{k}={v} " for k, v in sorted(args.items())) \
        if args else ""
    created_by = prefix + " ".join(argv)
    key = records.cache_key(sb.parent_id(), f"RUN {created_by}\nnetwork={network}")
    if sb.cached_step(key):
        return True
    m = sb.ensure_mount()
    env = tuple(f"{k}={v}" for k, v in sorted({**args, **proxies}.items()))
    status, tail = _run(sb, m, argv, env, network, step)
    if status != 0:
        raise BuildStepFailed(f"{where}: the command {' '.join(argv)!r} returned a non-zero "
                              f"code: {status}", status, tail)
    sb.commit_files(created_by, key)
    return False


def _run(sb: StageBuilder, m: StageMount, argv: Sequence[str], env: tuple[str, ...],
         network: str, step: int) -> tuple[int, str]:
    """Run ``argv`` in the stage's rootfs; its exit status and the last lines of its output.
    The runtime keeps its state in the stage's directory and the mount's daemon guards the
    container's init, so a killed build leaves neither behind."""
    rootfs = m.path
    cfg = sb.cfg
    cid = "strata-build-" + uuid.uuid4().hex[:16]
    bundle = os.path.join(m.dir, cid)
    os.mkdir(bundle, 0o700)
    hostname = socket.gethostname() if network == "host" else cid[-12:]
    binds = etc_files(bundle, hostname, network)
    root = DestRoot(rootfs)
    passwd, group = root.read("/etc/passwd"), root.read("/etc/group")
    user = resolve_user(str(cfg.get("User") or ""), passwd, group, ())
    workdir = str(cfg.get("WorkingDir") or "/")
    wd = root.locate(workdir)
    if not os.path.isdir(root.host(wd)):
        root.mkdirs(wd, (0, 0))  # docker makes a missing working directory for RUN
    opts = RunOptions(command=tuple(argv), entrypoint=(), env=env, network=network)
    doc = spec({**cfg, "Entrypoint": None, "Cmd": None}, opts, rootfs=rootfs, user=user,
               hostname=hostname, workdir=workdir, binds=binds,
               seccomp=load(None, capabilities(opts)), cgroups_path=None,
               cgroup_namespace=os.path.exists("/sys/fs/cgroup/cgroup.controllers"))
    with open(os.path.join(bundle, "config.json"), "w") as f:
        json.dump(doc, f)
    rt = OCIRuntime.find(None, os.path.join(m.dir, "runtime"), cgroups=False)
    guarded: list[int] = []
    cancelled = threading.Event()

    def on_start(pid: int) -> None:
        guard(m.control, pid)
        guarded.append(pid)
        if cancelled.is_set():
            _kill(pid)

    r, w = os.pipe2(os.O_CLOEXEC)
    start = time.monotonic()
    lines: list[str] = []

    def relay() -> None:
        buf = b""
        with os.fdopen(r, "rb", buffering=0) as f:
            while data := f.read(65536):
                buf += data
                *done, buf = buf.split(b"\n")
                for raw in done:
                    text = raw.decode(errors="replace").rstrip("\r")
                    lines.append(text)
                    del lines[:-TAIL]
                    sb.b.output(step, text, time.monotonic() - start)
        if buf:
            text = buf.decode(errors="replace")
            lines.append(text)
            sb.b.output(step, text, time.monotonic() - start)

    reader = threading.Thread(target=relay, daemon=True)
    reader.start()
    results: list[RunResult] = []
    errors: list[BaseException] = []

    def runner() -> None:
        try:
            results.append(run_bundle(rt, bundle, cid, Streams(stdout=w, stderr=w),
                                      tty=False, interactive=False, on_start=on_start))
        except BaseException as exc:  # handed to the main thread
            errors.append(exc)

    # The runtime runs in a worker thread, where signals are not forwarded to the container
    # (as strata run does): Ctrl-C and SIGTERM stop the build here, and kill the command.
    worker = threading.Thread(target=runner, daemon=True)
    worker.start()
    try:
        while worker.is_alive():
            worker.join(0.2)
    except BaseException:
        cancelled.set()
        for pid in guarded:
            _kill(pid)
        worker.join()
        raise
    finally:
        os.close(w)
        reader.join()
        for pid in guarded:
            guard(m.control, pid, on=False)
    if errors:
        raise errors[0]
    return results[0].status, "\n".join(lines[-TAIL:])


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


INIT_TARGETS = [("/proc", True), ("/dev", True), ("/sys", True), ("/etc/hosts", False),
                ("/etc/hostname", False), ("/etc/resolv.conf", False)]


def write_init(store: Store, image: Image | None, init: str) -> bool:
    """Stubs in ``init`` for the mount targets RUN needs that ``image``'s rootfs lacks, in
    directories with the attributes the rootfs gives them; False when none is missing."""
    targets = stub_targets(RunOptions(), [Bind("/dev/null", p) for p, d in INIT_TARGETS
                                          if not d])
    if image is None or not image.diff_ids:
        return write_stubs(None, init, targets)
    with store.layers.opened(store.layers.stack(image.diff_ids)) as layers:
        return write_stubs(RootView(UnionView(layers)), init, targets)
