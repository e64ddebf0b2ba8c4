"""``strata run``: a command in a container, on its union mount, through an OCI runtime.

``run`` takes an image (a new container is created, ``--name``; ``--rm`` removes it at the
end) or an existing container (run again with its writable layer), and:

1. reads what the spec needs from the container's layers without mounting them (the image
   config, the user from ``/etc/passwd`` and ``/etc/group``, the working directory), through
   ``runtime_user.RootView``;
2. writes the container's **init layer** ``containers/<id>/init``: empty stubs for the mount
   targets the rootfs lacks (``/proc``, ``/dev``, ``/sys``, ``/etc/hosts``, ``/etc/hostname``,
   ``/etc/resolv.conf``, ``-v`` and ``--tmpfs`` targets), as docker's ``-init`` layer.  The
   container mount puts it right above the image's layers (``Containers.open_layers``), so
   the runtime finds its targets and nothing lands in the writable layer: stubs never show in
   ``diff``, ``commit`` or ``export``.  An existing directory the stubs go into is recreated
   with the image's mode, owner and mtime, so the merged view does not change;
3. writes ``/etc/hosts``, ``/etc/hostname`` (and ``/etc/resolv.conf`` with ``--network
   host``) as files of ``containers/<id>/``, bind-mounted by the spec;
4. mounts the container (``allow_other``, so the image's users pass the kernel's permission
   checks; ``suid``, as docker's overlay mounts) at ``containers/<id>/run/rootfs`` in a
   directory only root can enter, creates a missing working directory in it (in the writable
   layer, as docker does), writes ``config.json`` and runs it (``runner.run_bundle``);
5. records the run in ``containers/<id>/run/state.json`` (``strata ps``: Up, Exited (N)),
   unmounts, and with ``remove`` deletes the container.

Seams: the mount is ``Store.mount`` (a black box that yields the mountpoint); the runtime is
``runner``; the spec is ``runtime``.  ``stop`` kills a running container (``rm -f``).

Caveats:
* A stub cannot show through a directory that the writable layer made opaque or a whiteout it
  holds; the runtime then creates that target in the writable layer.
* The init layer is rebuilt before each run; ``strata mount`` of the container includes the
  last one, so a plain mount shows the stubs of the last run (empty files, empty directories).
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import shlex
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from unionfs.layers import DirLayer
from unionfs.resolve import UnionView
from unionfs.upper import remove_tree

from . import mounting, runtime, runtime_seccomp, runtime_user, timefmt
from .containers import Container, Containers, process_alive
from .errors import Conflict, ContainerNotFound, ImageNotFound
from .runner import OCIRuntime, RunResult, Streams, run_bundle
from .runtime import Bind, RunError, RunOptions
from .runtime_user import RootView
from .store import Image, Store

log = logging.getLogger(__name__)
NOT_ROOT = "strata run needs root (the OCI runtime makes namespaces and mounts)"


@dataclass(frozen=True)
class RunState:
    """The last run of a container: ``running`` (``pid`` is the ``strata run`` process,
    ``init`` the container's pid 1) or ``exited`` with ``exit_code``."""

    status: str
    pid: int
    init: int
    started: str
    finished: str = ""
    exit_code: int = 0

    @property
    def running(self) -> bool:
        return self.status == "running" and process_alive(self.pid)


def _state_path(container: Container) -> str:
    return os.path.join(container.root, "run", "state.json")


def state_of(container: Container) -> RunState | None:
    """The container's last run, None if it never ran."""
    try:
        with open(_state_path(container)) as f:
            return RunState(**json.load(f))
    except (OSError, ValueError, TypeError):
        return None


def status_line(container: Container, since: Callable[[str], str]) -> str | None:
    """docker's STATUS for a container that ran: ``Up 3 seconds``, ``Exited (0) 2 minutes
    ago``; None if it never ran.  ``since`` formats a timestamp as "N units ago"."""
    st = state_of(container)
    if st is None:
        return None
    if st.running:
        return "Up " + since(st.started).removesuffix(" ago")
    if st.status == "running":  # strata run was killed
        return "Exited (unknown)"
    return f"Exited ({st.exit_code}) {since(st.finished)}"


def _save_state(container: Container, state: RunState) -> None:
    path = _state_path(container)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state.__dict__, f)
    os.rename(tmp, path)


def stop(container: Container, timeout: float = 10.0) -> None:
    """Kill a running container (SIGKILL to its pid 1) and wait until its ``strata run`` has
    unmounted it and exited.  Nothing happens if it is not running."""
    st = state_of(container)
    if st is None or not st.running:
        return
    try:
        with open(f"/proc/{st.init}/stat") as f:
            parent = int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError, IndexError):
        parent = -1
    if parent == st.pid:  # still the init strata run started (not a reused pid)
        with contextlib.suppress(ProcessLookupError):
            os.kill(st.init, signal.SIGKILL)
    deadline = time.monotonic() + timeout
    while process_alive(st.pid) and time.monotonic() < deadline:
        time.sleep(0.02)


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
        name: str | None = None, remove: bool = False, runtime_path: str | None = None
        ) -> RunResult:
    """Run ``opts``'s command in ``target`` (an image: a new container; a container: run
    again) and return its exit status (and output, with ``streams.capture``).  Raises
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
        return _run(store, cs, container, opts, streams, rt, phases)
    finally:
        if remove:
            with contextlib.suppress(ContainerNotFound, Conflict):
                cs.remove(container)
            phases.done("remove")
        log.debug("strata run %s: %s", container.short_id, phases.report())


def _run(store: Store, cs: Containers, container: Container, opts: RunOptions,
         streams: Streams, rt: OCIRuntime, phases: _Phases) -> RunResult:
    where = cs.mounted_at(container)
    if where is not None:
        state = state_of(container)
        if state is not None and state.running:
            raise Conflict(f"container {container.name} is already running")
        raise Conflict(f"container {container.name} is mounted at {where}; unmount it first")
    image = store.image(container.image)  # type: ignore[arg-type]
    config = image.config.container_config
    run_dir = os.path.join(container.root, "run")
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chmod(run_dir, 0o700)  # the mount below is suid and allow_other: only root may enter
    hostname = runtime.valid_hostname(opts.hostname) if opts.hostname else (
        socket.gethostname() if opts.network == "host" else container.short_id)
    binds = _write_files(container, opts, hostname)
    workdir = opts.workdir or config.get("WorkingDir") or "/"
    if not workdir.startswith("/"):
        raise RunError(f"the working directory {workdir!r} is invalid: it needs to be an "
                       "absolute path")
    with store.layers_of(image) as layers:
        root = RootView(UnionView([DirLayer(container.upper), *layers]))
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
    phases.done("prepare")
    plan = mounting.plan(store, container, os.path.join(run_dir, "rootfs"), allow_other=True,
                         suid=True)
    with mounting.mount_plan(plan) as mountpoint:
        phases.done("mount")
        if wd_node is None:
            os.makedirs(os.path.join(mountpoint, wd_path), 0o755, exist_ok=True)
        spec = runtime.spec(config, opts, rootfs=str(mountpoint), user=user, hostname=hostname,
                            workdir=workdir, binds=binds, seccomp=seccomp,
                            cgroups_path=f"/strata/{container.id}" if opts.cgroups else None,
                            cgroup_namespace=os.path.exists("/sys/fs/cgroup/cgroup.controllers"))
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump(spec, f)
        started = timefmt.now()

        def on_start(pid: int) -> None:
            _save_state(container, RunState("running", os.getpid(), pid, started))
            phases.done("create+start")

        try:
            result = run_bundle(rt, run_dir, container.id, streams, tty=opts.tty,
                                interactive=opts.interactive, on_start=on_start)
        finally:
            if opts.cgroups:
                _remove_cgroups(container.id)
        phases.done("command")
        _save_state(container, RunState("exited", os.getpid(), 0, started, timefmt.now(),
                                        result.status))
    phases.done("unmount")
    return result


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


def _write_files(container: Container, opts: RunOptions, hostname: str) -> list[Bind]:
    """``/etc/hosts``, ``/etc/hostname`` (and the host's ``/etc/resolv.conf`` with ``--network
    host``) as files of the container's directory, to be bind-mounted."""
    files: dict[str, bytes] = {"hosts": runtime.hosts_file(hostname, opts.network),
                               "hostname": hostname.encode() + b"\n"}
    if opts.network == "host":
        try:
            with open("/etc/resolv.conf", "rb") as f:
                files["resolv.conf"] = f.read()
        except OSError:
            files["resolv.conf"] = b""
    binds = []
    for name, data in files.items():
        path = os.path.join(container.root, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        binds.append(Bind(path, "/etc/" + name))
    return binds


def _build_init(container: Container, root: RootView,
                targets: list[tuple[str, bool]]) -> None:
    """Write ``containers/<id>/init``: stubs for the ``targets`` (path, is_dir) the rootfs
    lacks, in directories that carry the attributes of the rootfs' own; no init layer when
    nothing is missing.  Built aside and swapped in, so a mount never sees half of it."""
    init = os.path.join(container.root, "init")
    new, old = init + ".new", init + ".old"
    for leftover in (new, old):
        remove_tree(leftover)
    attrs: dict[str, Any] = {}
    made = False
    for path, is_dir in targets:
        resolved, node = root.resolve(path)
        if node is not None or not resolved:
            continue
        parents = root.parents(resolved)
        if any(n is not None and not n.is_dir for _, n in parents):
            continue  # a file where a directory should be: the runtime will say so
        if not made:
            os.mkdir(new, 0o755)
            attrs[""] = root.view.root().entry
            made = True
        for rel, n in [*parents, (resolved, None)]:
            full = os.path.join(new, rel)
            if rel == resolved and not is_dir:
                if not os.path.lexists(full):
                    os.close(os.open(full, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC))
                    os.chmod(full, 0o644)  # whatever the umask
            elif not os.path.isdir(full):
                os.mkdir(full)
                os.chmod(full, 0o755)
            if n is not None:
                attrs[rel] = n.entry
    for rel, e in attrs.items():
        full = os.path.join(new, rel) if rel else new
        if os.geteuid() == 0:
            os.chown(full, e.uid, e.gid)
        os.chmod(full, e.mode & 0o7777)
        os.utime(full, ns=(e.mtime_ns, e.mtime_ns))
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
            tty: bool = False, security_opt: Sequence[str] = (), cgroups: bool = True
            ) -> RunOptions:
    """``RunOptions`` from Python values (``Store.run``): a string command or entrypoint is
    split as a shell would (``shlex``), ``env`` is a mapping or ``K=V``/``K`` strings,
    ``volumes`` and ``tmpfs`` are docker's strings."""
    if network not in ("none", "host"):
        raise RunError(f"unsupported network {network!r} (none or host)")
    if isinstance(env, Mapping):
        env_items = [f"{k}={v}" for k, v in env.items()]
    else:
        env_items = runtime.parse_env(env or (), os.environ)
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
        seccomp=seccomp, cgroups=cgroups)


def _argv(value: str | Sequence[str] | None) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return tuple(shlex.split(value))
    return tuple(value)


def with_console_size(opts: RunOptions, size: tuple[int, int] | None) -> RunOptions:
    """``opts`` with the terminal's initial size (rows, columns)."""
    return dataclasses.replace(opts, console_size=size)
