"""``strata run``: a command in a container, on its union mount, through an OCI runtime.

``run`` takes an image (a new container is created, ``--name``; ``--rm`` removes it at the
end) or an existing container (run again with its writable layer), and:

1. plans the container's mount (``mounting.plan``), which takes its mount lock: from then on
   no other mount or run of it can start, so the upper and the init layer hold still;
2. reads what the spec needs from the container's layers without mounting them (the image
   config, the user from ``/etc/passwd`` and ``/etc/group``, the working directory), through
   ``runtime_user.RootView``;
3. writes the container's **init layer** ``containers/<id>/init``: empty stubs for the mount
   targets the rootfs lacks (``/proc``, ``/dev``, ``/sys``, ``/etc/hosts``, ``/etc/hostname``,
   ``/etc/resolv.conf``, ``-v`` and ``--tmpfs`` targets), as docker's ``-init`` layer.  The
   container's mount puts it right below the writable layer (``Containers.describe`` with
   ``init``; the plan's layers are described again once it is built), so the runtime finds
   its targets and nothing lands in the writable layer: stubs never show in ``diff``,
   ``commit`` or ``export``, which describe the container without it.  An existing directory
   the stubs go into is recreated with the image's mode, owner and mtime, so the merged view
   does not change;
4. writes ``/etc/hosts``, ``/etc/hostname`` (and ``/etc/resolv.conf`` with ``--network
   host``) as files of ``containers/<id>/``, bind-mounted by the spec;
5. mounts the container (``allow_other``, so the image's users pass the kernel's permission
   checks; ``suid``, as docker's overlay mounts) at ``containers/<id>/run/rootfs`` in a
   directory only root can enter, creates a missing working directory in it (in the writable
   layer, as docker does), writes ``config.json`` and runs it (``runner.run_bundle``);
6. records the run in ``containers/<id>/run/state.json`` (``Container.last_run``;
   ``strata ps``: Up, Exited (N)), unmounts, and with ``remove`` deletes the container.

Seams: the mount is ``mounting.mounted`` (a black box that yields the mountpoint); the runtime
is ``runner``; the spec is ``runtime``.  ``stop`` kills a running container (``rm -f``);
``runtime_leftovers`` and ``clear_runtime`` find and clear the runtime's state a killed
``strata run`` left under ``<root>/runtime/`` (``strata check``).

Caveats:
* A stub cannot show through a directory that the writable layer made opaque or a whiteout it
  holds; the runtime then creates that target in the writable layer.
* The init layer is rebuilt before each run; ``strata mount`` of the container includes the
  last one, so a plain mount shows the stubs of the last run (empty files, empty directories).
* A ``strata run`` killed with SIGKILL cannot clean up.  Its mount ends with it (the daemon's
  lifeline), but its command runs on, orphaned, without a root file system (ENOTCONN, or
  SIGBUS when it pages in code, at its next access), and the runtime's state and cgroup stay.
  ``strata ps`` shows it ``Up … (orphaned …)`` while the command lives, ``strata check``
  reports the runtime's state, and ``--repair`` or ``rm -f`` deletes it (killing what is
  left); the next run of the container does the same once the command is gone.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unionfs.resolve import UnionView
from unionfs.upper import remove_tree

from . import mounting, runtime, runtime_seccomp, runtime_user, timefmt
from .containers import Container, Containers, alive_since, run_state_path, started_at
from .errors import Conflict, ContainerNotFound, ImageNotFound
from .images import Image
from .initlayer import write_stubs
from .runner import OCIRuntime, RunResult, Streams, run_bundle
from .runtime import Bind, RunError, RunOptions
from .runtime_user import RootView

if TYPE_CHECKING:
    from .api import Store

log = logging.getLogger(__name__)
NOT_ROOT = "strata run needs root (the OCI runtime makes namespaces and mounts)"
RUNTIMES = ("crun", "runc")  # the kinds under <root>/runtime/ (runner.OCIRuntime.state_root)


def _save_state(container: Container, status: str, init: int, started: str,
                finished: str = "", exit_code: int = 0) -> None:
    """Write ``run/state.json`` (``containers.read_run_state`` reads it) atomically."""
    path = run_state_path(container.root)
    doc = {"status": status, "pid": os.getpid(), "pid_start": started_at(os.getpid()),
           "init": init, "init_start": started_at(init) if init > 0 else None,
           "started": started, "finished": finished, "exit_code": exit_code}
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(doc, f)
    os.rename(tmp, path)


def _raw_state(container: Container) -> dict[str, Any]:
    try:
        with open(run_state_path(container.root)) as f:
            doc = json.load(f)
        return doc if isinstance(doc, dict) else {}
    except (OSError, ValueError):
        return {}


def stop(store: Store, container: Container, timeout: float = 10.0) -> None:
    """Kill a running container (SIGKILL to its pid 1), wait until its ``strata run`` has
    unmounted it and exited, and clear what a killed ``strata run`` left: the runtime's
    state and cgroup (its last run then reads as ``unknown``).  Nothing happens if it is not
    running."""
    doc = _raw_state(container)
    if doc.get("status") != "running":
        return
    init, runner = int(doc.get("init") or 0), int(doc.get("pid") or 0)
    if alive_since(init, doc.get("init_start")):
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while alive_since(runner, doc.get("pid_start")) and time.monotonic() < deadline:
        time.sleep(0.02)
    if not alive_since(runner, doc.get("pid_start")) and \
            _raw_state(container).get("status") == "running":  # its strata run was killed
        clear_runtime(store.root, container.id)


def runtime_leftovers(root: str, cid: str | None = None) -> list[tuple[str, str]]:
    """The OCI runtimes' state under ``<root>/runtime/`` as ``(kind, container ID)``: what
    ``strata run`` leaves only when it is killed (it deletes the state when the command
    ends).  Only ``cid``'s with ``cid``."""
    out = []
    for kind in RUNTIMES:
        base = os.path.join(root, "runtime", kind)
        names = [cid] if cid is not None else sorted(os.listdir(base)) \
            if os.path.isdir(base) else []
        out += [(kind, n) for n in names if os.path.isdir(os.path.join(base, n))]
    return out


def clear_runtime(root: str, cid: str) -> None:
    """Delete the runtime's state of container ``cid`` (``RUNTIME delete --force``: what is
    left of the container is killed) and its cgroup.  Raises ``RunError`` when the runtime
    that made the state is not installed."""
    for kind, _ in runtime_leftovers(root, cid):
        rt = OCIRuntime.find(kind, os.path.join(root, "runtime"))
        rt.delete(os.path.join(root, "runtime", f"{kind}-{cid[:12]}.log"), cid)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(root, "runtime", f"{kind}-{cid[:12]}.log"))
        if os.path.isdir(os.path.join(rt.state_root, cid)):
            raise RunError(f"{kind} did not delete its state of container {cid[:12]}")
    _remove_cgroups(cid)


@dataclass
class _Phases:
    """Per-phase wall times of one run, logged at DEBUG (``--log-level debug``)."""

    last: float
    times: dict[str, float]

    def done(self, name: str) -> None:
        now = time.perf_counter()
        self.times[name] = now - self.last
        self.last = now

    def report(self) -> str:
        return " ".join(f"{k}={v * 1000:.1f}ms" for k, v in self.times.items())


def run(store: Store, target: str | Image | Container, opts: RunOptions, streams: Streams, *,
        name: str | None = None, remove: bool = False, runtime_path: str | None = None,
        engine: str | None = None) -> RunResult:
    """Run ``opts``'s command in ``target`` (an image: a new container; a container: run
    again) and return its exit status (and output, with ``streams.capture``).  ``engine``:
    the mount's (``mountplan.engine_for``; default ``run``'s, ``auto``).  Raises
    ``RunError`` (strata's or the runtime's refusal; ``exit_status`` 125, 126 or 127),
    ``ImageNotFound``, ``ContainerNotFound``, ``Conflict`` (mounted or running elsewhere),
    ``MountFailed``."""
    phases = _Phases(time.perf_counter(), {})
    if os.geteuid() != 0:
        raise RunError(NOT_ROOT)
    rt = OCIRuntime.find(runtime_path, os.path.join(store.root, "runtime"),
                         cgroups=opts.cgroups)
    cs = Containers(store)
    container = target if isinstance(target, Container) else \
        cs.find(target) if isinstance(target, str) else None
    if container is not None and name is not None:
        raise RunError(f"--name is for a new container; {container.name} exists already")
    if container is None:
        image_ref = target.id if isinstance(target, Image) else target
        assert isinstance(image_ref, str)
        try:
            store.resolve(image_ref)
        except ImageNotFound:
            raise ImageNotFound(f"No such image or container: {image_ref}") from None
        container = cs.create(image_ref, name)
    else:
        container = cs.get(container.id)
    phases.done("container")
    try:
        return _run(store, cs, container, opts, streams, rt, phases, engine)
    finally:
        if remove:
            with contextlib.suppress(ContainerNotFound, Conflict):
                cs.remove(container)
            phases.done("remove")
        log.debug("strata run %s: %s", container.short_id, phases.report())


def _run(store: Store, cs: Containers, container: Container, opts: RunOptions,
         streams: Streams, rt: OCIRuntime, phases: _Phases, engine: str | None) -> RunResult:
    ran = container.last_run
    if ran is not None and ran.status == "running":
        how = " (its strata run was killed: strata rm -f or strata check --repair ends it)" \
            if ran.orphaned else ""
        raise Conflict(f"container {container.name} is already running{how}")
    run_dir = os.path.join(container.root, "run")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)  # the mount below is suid and allow_other: only root may enter
    # the plan takes the container's mount lock (Conflict if it is mounted): from here on
    # nothing else writes its upper or mounts its init layer while this run rebuilds it
    plan = mounting.plan(store, container, os.path.join(run_dir, "rootfs"), allow_other=True,
                         suid=True, engine=engine, purpose="run")
    try:
        prepared = _prepare(store, cs, container, opts)
        # the mount spec's layers again: with the init layer just built
        plan.set_layers(store.layers.for_mount(cs.describe(container, upper=False, init=True)))
    except BaseException:
        plan.close()
        raise
    phases.done("prepare")
    with mounting.mounted(plan) as mountpoint:
        phases.done("mount")
        p = prepared
        if p.workdir_missing:
            os.makedirs(os.path.join(mountpoint, p.workdir_path), 0o755, exist_ok=True)
        spec = runtime.spec(p.config, opts, rootfs=str(mountpoint), user=p.user,
                            hostname=p.hostname, workdir=p.workdir, binds=p.binds,
                            seccomp=p.seccomp,
                            cgroups_path=f"/strata/{container.id}" if opts.cgroups else None,
                            cgroup_namespace=os.path.exists("/sys/fs/cgroup/cgroup.controllers"))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(spec, f)
        phases.done("spec")
        started = timefmt.now()

        def on_start(pid: int) -> None:
            _save_state(container, "running", pid, started)

        try:
            result = run_bundle(rt, run_dir, container.id, streams, tty=opts.tty,
                                interactive=opts.interactive, on_start=on_start,
                                phase=phases.done)
        finally:
            if opts.cgroups:
                _remove_cgroups(container.id)
        phases.done("cgroups")
        _save_state(container, "exited", 0, started, timefmt.now(), result.status)
        phases.done("state")
    phases.done("unmount")
    return result


@dataclass(frozen=True)
class _Prepared:
    """What the runtime spec needs besides the options."""

    config: dict[str, Any]
    user: runtime_user.ExecUser
    hostname: str
    binds: list[Bind]
    workdir: str
    workdir_path: str  # relative to the rootfs, symlinks resolved
    workdir_missing: bool  # to be made in the writable layer once mounted
    seccomp: dict[str, Any] | None


def _prepare(store: Store, cs: Containers, container: Container, opts: RunOptions
             ) -> _Prepared:
    """What the spec needs, read from the container's layers without mounting them (the
    image config, the user, the working directory), with the files to bind-mount and the
    init layer written."""
    config = store.image(container.image).config.container_config
    hostname = runtime.valid_hostname(opts.hostname) if opts.hostname else (
        socket.gethostname() if opts.network == "host" else container.short_id)
    binds = runtime.etc_files(container.root, hostname, opts.network)
    workdir = opts.workdir or config.get("WorkingDir") or "/"
    if not workdir.startswith("/"):
        raise RunError(f"the working directory {workdir!r} is invalid: it needs to be an "
                       "absolute path")
    with cs.layers(container, upper=True) as layers:  # without the init layer it rebuilds
        root = RootView(UnionView(layers))
        spec_user = opts.user if opts.user is not None else str(config.get("User") or "")
        user = runtime_user.resolve_user(spec_user, root.read("etc/passwd"),
                                         root.read("etc/group"), opts.group_add)
        wd_path, wd_node = root.resolve(workdir)
        if wd_node is not None and not wd_node.is_dir:
            raise RunError(f"the working directory {workdir} is not a directory")
        _build_init(container, root, runtime.stub_targets(opts, binds))
    caps = runtime.capabilities(opts)
    seccomp = runtime_seccomp.load(opts.seccomp, caps)
    if seccomp is None and opts.seccomp is None and not opts.privileged:
        log.warning("no seccomp profile is installed (Debian package "
                    "golang-github-containers-common): the container runs unfiltered")
    return _Prepared(config, user, hostname, binds, workdir, wd_path, wd_node is None, seccomp)


def _remove_cgroups(cid: str) -> None:
    """Remove the container's cgroups should the runtime have left one (it removes them when
    it deletes the container; one whose last process was still exiting can stay behind)."""
    for path in [*glob.glob(f"/sys/fs/cgroup/*/strata/{cid}"), f"/sys/fs/cgroup/strata/{cid}"]:
        for _ in range(50):
            try:
                os.rmdir(path)
            except FileNotFoundError:
                break
            except OSError:
                time.sleep(0.01)  # EBUSY while the last task goes
            else:
                break


def _build_init(container: Container, root: RootView,
                targets: list[tuple[str, bool]]) -> None:
    """Write ``containers/<id>/init``: stubs for the ``targets`` (path, is_dir) the rootfs
    lacks, in directories that carry the attributes of the rootfs' own; no init layer when
    nothing is missing.  Built aside and swapped in, so a mount never sees half of it."""
    init = container.init
    new, old = init + ".new", init + ".old"
    for leftover in (new, old):
        remove_tree(leftover)
    made = write_stubs(root, new, targets)
    if os.path.isdir(init):
        os.rename(init, old)
    if made:
        os.rename(new, init)
    remove_tree(old)


def options(command: str | Sequence[str] | None = None, *,
            entrypoint: str | Sequence[str] | None = None,
            env: Mapping[str, str] | Sequence[str] | None = None, workdir: str | None = None,
            user: str | None = None, group_add: Sequence[str] = (),
            hostname: str | None = None, network: str = "none",
            volumes: Sequence[str] = (), tmpfs: Sequence[str] = (),
            cap_add: Sequence[str] = (), cap_drop: Sequence[str] = (),
            privileged: bool = False, read_only: bool = False, interactive: bool = False,
            tty: bool = False, security_opt: Sequence[str] = (), cgroups: bool = True,
            env_file: Sequence[str] = (), console_size: tuple[int, int] | None = None
            ) -> RunOptions:
    """``RunOptions`` from Python values (``Store.run``): a string command or entrypoint is
    split as a shell would (``shlex``), ``env`` is a mapping or ``K=V``/``K`` strings (after
    the ``env_file`` files' lines), ``volumes`` and ``tmpfs`` are docker's strings,
    ``console_size`` the terminal's (rows, columns)."""
    if network not in ("none", "host"):
        raise RunError(f"unsupported network {network!r} (none or host)")
    env_items = [line for path in env_file for line in runtime.read_env_file(path, os.environ)]
    if isinstance(env, Mapping):
        env_items += [f"{k}={v}" for k, v in env.items()]
    else:
        env_items += runtime.parse_env(env or (), os.environ)
    for c in [*cap_add, *cap_drop]:
        runtime.cap_name(c)
    nnp, seccomp = False, None
    for opt in security_opt:
        key, _, value = opt.replace(":", "=", 1).partition("=")
        if key == "no-new-privileges" and value in ("", "true"):
            nnp = True
        elif key == "no-new-privileges" and value == "false":
            nnp = False
        elif key == "seccomp" and value:
            seccomp = value
        else:
            raise RunError(f"unsupported --security-opt {opt!r} (no-new-privileges, "
                           "seccomp=unconfined|PATH)")
    return RunOptions(
        command=tuple(_argv(command) or ()), entrypoint=_argv(entrypoint),
        env=tuple(env_items), workdir=workdir, user=user, group_add=tuple(group_add),
        hostname=hostname, network=network,
        volumes=tuple(runtime.parse_volume(v) for v in volumes),
        tmpfs=tuple(runtime.parse_tmpfs(t) for t in tmpfs),
        cap_add=tuple(cap_add), cap_drop=tuple(cap_drop), privileged=privileged,
        read_only=read_only, interactive=interactive, tty=tty, no_new_privileges=nnp,
        seccomp=seccomp, cgroups=cgroups, console_size=console_size if tty else None)


def _argv(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(value)

