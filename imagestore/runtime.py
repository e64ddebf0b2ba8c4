"""The OCI runtime spec of a container run, from its image config, as docker and podman write it.

``RunOptions`` holds what ``strata run`` was asked (docker's flags); ``spec`` turns the image's
runtime config plus those options into the ``config.json`` an OCI runtime (crun, runc) runs:

* process: ``Entrypoint`` + ``Cmd`` by docker's rules (``--entrypoint`` drops the image's
  ``Cmd``; a command replaces ``Cmd``), ``Env`` (image, then ``--env-file``, then ``-e``; a
  default ``PATH``, ``HOSTNAME``, ``HOME`` from the user's passwd entry, ``TERM`` with a
  terminal), ``cwd`` (``WorkingDir`` or ``-w``), the user (``runtime_user``: resolved as runc
  resolves it), docker's default capabilities (only ``--cap-add`` ones for a non-root user, as
  podman);
* namespaces pid, mount, ipc, uts and network (none with ``--network host``);
* mounts: ``/proc``, ``/dev`` (tmpfs; the runtime adds the standard devices), ``/dev/pts``,
  ``/dev/shm``, ``/dev/mqueue``, ``/sys`` and ``/sys/fs/cgroup`` read-only, then the files
  strata keeps outside the container's layer (``/etc/hosts``, ``/etc/hostname``,
  ``/etc/resolv.conf``), ``-v`` binds and ``--tmpfs``, parents before children;
* docker's masked and read-only paths, a device cgroup that denies everything but the
  runtime's standard devices, the seccomp profile given (``runtime_seccomp``).

Seams: nothing here reads the container's rootfs (the user comes resolved from
``runtime_user``); the host is read only for what docker reads there too (``-v`` sources, the
bounding capabilities, ``/dev`` with ``--privileged``, ``/etc/hosts`` with ``--network
host``).  Parsing of docker's flag syntax (``-v``, ``--tmpfs``, ``-e``, ``--env-file``,
``--cap-add``) lives here too, so the CLI and the API accept the same strings.

Caveats:
* ``--privileged`` gives every capability, no masked paths, ``/sys`` read-write and every
  device of the host's ``/dev``, as docker does.
* A ``-v`` host path must exist (docker makes a missing one a directory; podman refuses it,
  as here).
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .errors import StoreError

if TYPE_CHECKING:
    from .runtime_user import ExecUser

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
# moby oci/caps/defaults.go
DEFAULT_CAPS = ("CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
                "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
                "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE")
_CAP_NAMES = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID",
              "SETUID", "SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST",
              "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER", "SYS_MODULE", "SYS_RAWIO",
              "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
              "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE",
              "AUDIT_CONTROL", "SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM",
              "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF", "CHECKPOINT_RESTORE")
# moby oci/defaults.go
MASKED_PATHS = ("/proc/asound", "/proc/acpi", "/proc/interrupts", "/proc/kcore", "/proc/keys",
                "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats",
                "/proc/sched_debug", "/proc/scsi", "/sys/firmware",
                "/sys/devices/virtual/powercap")
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")
# what the runtime mounts itself: targets below these never need a stub in the rootfs
KERNEL_MOUNTS = ("/proc", "/dev", "/sys")
MAX_ID = (1 << 31) - 1


class RunError(StoreError):
    """A run that strata refuses or cannot set up (exit status 125 on the command line): a bad
    flag value, an unknown user or group, no command, no runtime, not root.  ``exit_status``
    is docker's for it: 125, or 126 (cannot execute) and 127 (not found) when the runtime could
    not start the command."""

    def __init__(self, message: str, exit_status: int = 125) -> None:
        super().__init__(message)
        self.exit_status = exit_status


@dataclass(frozen=True)
class Volume:
    """``-v HOST:CTR[:ro]``: a bind mount of the host path ``source`` at ``destination``."""

    source: str
    destination: str
    read_only: bool = False


@dataclass(frozen=True)
class Tmpfs:
    """``--tmpfs DIR[:OPTIONS]``: a new tmpfs (docker's default options are added)."""

    destination: str
    options: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunOptions:
    """What to run and how: docker's ``run`` flags, parsed (``RunOptions.parse`` helpers)."""

    command: tuple[str, ...] = ()
    entrypoint: tuple[str, ...] | None = None  # None: the image's; () clears it
    env: tuple[str, ...] = ()  # K=V, applied after the image's Env, later ones win
    workdir: str | None = None
    user: str | None = None
    group_add: tuple[str, ...] = ()
    hostname: str | None = None
    network: str = "none"  # none | host
    privileged: bool = False
    cap_add: tuple[str, ...] = ()
    cap_drop: tuple[str, ...] = ()
    volumes: tuple[Volume, ...] = ()
    tmpfs: tuple[Tmpfs, ...] = ()
    tty: bool = False
    interactive: bool = False
    read_only: bool = False
    no_new_privileges: bool = False
    seccomp: str | None = None  # None: the default profile; "unconfined"; a profile's path
    cgroups: bool = True
    console_size: tuple[int, int] | None = None  # (rows, columns) for the terminal
    annotations: Mapping[str, str] = field(default_factory=dict)


# -- docker's flag syntax --------------------------------------------------------------------------


def parse_volume(text: str) -> Volume:
    """``HOST:CTR[:ro|rw]``; both paths absolute (named volumes are not supported)."""
    parts = text.split(":")
    mode = ""
    if len(parts) == 3:
        mode = parts.pop()
    if len(parts) != 2 or not parts[0] or not parts[1]:
        raise RunError(f"invalid volume specification: {text!r} (HOST:CONTAINER[:ro])")
    src, dst = parts
    if not src.startswith("/"):
        raise RunError(f"invalid volume specification: {text!r}: the host path must be "
                       "absolute (named volumes are not supported)")
    if not dst.startswith("/"):
        raise RunError(f"invalid volume specification: {text!r}: the container path must "
                       "be absolute")
    if mode not in ("", "ro", "rw"):
        raise RunError(f"invalid mode {mode!r} in volume {text!r} (ro or rw)")
    if not os.path.exists(src):
        raise RunError(f"invalid volume specification: {text!r}: {src} does not exist")
    return Volume(os.path.abspath(src), _clean(dst), mode == "ro")


def parse_tmpfs(text: str) -> Tmpfs:
    """``DIR[:OPT,OPT...]``."""
    dst, _, opts = text.partition(":")
    if not dst.startswith("/"):
        raise RunError(f"invalid tmpfs {text!r}: the path must be absolute")
    return Tmpfs(_clean(dst), tuple(o for o in opts.split(",") if o))


def parse_env(items: Iterable[str], environ: Mapping[str, str]) -> list[str]:
    """``-e`` values: ``K=V`` as is, ``K`` takes the caller's value (dropped when unset)."""
    out = []
    for item in items:
        name, eq, _ = item.partition("=")
        if not name or "\0" in item:
            raise RunError(f"invalid environment variable: {item!r}")
        if eq:
            out.append(item)
        elif name in environ:
            out.append(f"{name}={environ[name]}")
    return out


def read_env_file(path: str, environ: Mapping[str, str]) -> list[str]:
    """``--env-file``: ``K=V`` or ``K`` lines; blank lines and ``#`` comments skipped."""
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise RunError(f"cannot read env file {path}: {exc.strerror}") from None
    items = [ln.lstrip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    return parse_env(items, environ)


def cap_name(text: str) -> str:
    """``net_admin``, ``NET_ADMIN``, ``CAP_NET_ADMIN`` -> ``CAP_NET_ADMIN``; ``ALL`` stays."""
    name = text.strip().upper()
    if name == "ALL":
        return name
    if not name.startswith("CAP_"):
        name = "CAP_" + name
    if name[4:] not in _CAP_NAMES:
        raise RunError(f"unknown capability: {text!r}")
    return name


def all_caps() -> list[str]:
    """Every capability this process may pass on: the kernel's, within its bounding set."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
    except (OSError, ValueError):
        last = len(_CAP_NAMES) - 1
    bounding = (1 << (last + 1)) - 1
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapBnd:"):
                    bounding = int(line.split()[1], 16)
    except (OSError, ValueError):
        pass
    return ["CAP_" + n for i, n in enumerate(_CAP_NAMES[: last + 1]) if bounding >> i & 1]


def capabilities(opts: RunOptions) -> list[str]:
    """docker's TweakCapabilities: the default set (or all with ``--privileged`` or
    ``--cap-add ALL``) plus ``cap_add`` minus ``cap_drop`` (``--cap-drop ALL`` keeps only the
    added ones).  Without cgroups (no device cgroup) the default set lacks CAP_MKNOD."""
    adds = [cap_name(c) for c in opts.cap_add]
    drops = [cap_name(c) for c in opts.cap_drop]
    known = all_caps()
    if "ALL" in adds:
        return [c for c in known if c not in drops]
    if "ALL" in drops:
        return [c for c in dict.fromkeys(adds) if c in known]
    base = known if opts.privileged else list(DEFAULT_CAPS)
    if not opts.cgroups and not opts.privileged:
        # without a device cgroup, CAP_MKNOD would let root in the container make and open
        # any device node of the host (podman drops it as well where it has none)
        base.remove("CAP_MKNOD")
    caps = [c for c in base if c not in drops]
    return caps + [c for c in dict.fromkeys(adds) if c in known and c not in caps]


def _clean(path: str) -> str:
    return os.path.normpath("/" + path.lstrip("/")) if path else "/"


# -- process ---------------------------------------------------------------------------------------


def command_line(config: Mapping[str, Any], opts: RunOptions) -> list[str]:
    """Entrypoint + Cmd, as docker: ``--entrypoint`` replaces the image's and drops its Cmd; a
    command replaces Cmd."""
    if opts.entrypoint is not None:
        entrypoint = [a for a in opts.entrypoint]
        cmd = list(opts.command)
    else:
        entrypoint = list(config.get("Entrypoint") or [])
        cmd = list(opts.command) or list(config.get("Cmd") or [])
    args = entrypoint + cmd
    if not args or not args[0]:
        raise RunError("no command specified (the image has no Entrypoint or Cmd)")
    return args


def environment(config: Mapping[str, Any], opts: RunOptions, user: ExecUser,
                hostname: str) -> list[str]:
    """The image's Env, then ``opts.env`` (a later name replaces an earlier one in place), then
    what docker and runc add when absent: PATH, HOSTNAME, TERM (with a terminal), HOME."""
    merged: dict[str, str] = {}
    for item in [*(config.get("Env") or []), *opts.env]:
        name, _, value = item.partition("=")
        if name:
            merged[name] = value
    first = {"PATH": DEFAULT_PATH, "HOSTNAME": hostname, **({"TERM": "xterm"} if opts.tty
                                                             else {})}
    out = {**{k: v for k, v in first.items() if k not in merged}, **merged}
    out.setdefault("HOME", user.home or "/")
    return [f"{k}={v}" for k, v in out.items()]


# -- the spec --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bind:
    """A file strata keeps outside the container's layer, bind-mounted at ``destination``."""

    source: str
    destination: str
    read_only: bool = False


def mounts(opts: RunOptions, binds: Sequence[Bind]) -> list[dict[str, Any]]:
    """docker's default mounts, then ``binds``, ``-v`` and ``--tmpfs`` (a user mount at a
    default one's place replaces it), sorted so that parents come before their children."""
    sys_opts = ["nosuid", "noexec", "nodev", "rw" if opts.privileged else "ro"]
    defaults: list[dict[str, Any]] = [
        {"destination": "/proc", "type": "proc", "source": "proc",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
         "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
        {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
         "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620",
                     "gid=5"]},
        {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": sys_opts},
        {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup",
         "options": [*sys_opts, "relatime"]},
        {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
         "options": ["nosuid", "noexec", "nodev"]},
        {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
         "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
    ]
    user: list[dict[str, Any]] = []
    for b in binds:
        user.append({"destination": b.destination, "type": "bind", "source": b.source,
                     "options": ["rbind", "rprivate", *(["ro"] if b.read_only else [])]})
    for v in opts.volumes:
        user.append({"destination": v.destination, "type": "bind", "source": v.source,
                     "options": ["rbind", "rprivate", *(["ro"] if v.read_only else [])]})
    for t in opts.tmpfs:
        given = list(t.options)
        base = [o for o in ("rw", "noexec", "nosuid", "nodev") if
                not any(g in (o, _opposite(o)) for g in given)]
        user.append({"destination": t.destination, "type": "tmpfs", "source": "tmpfs",
                     "options": [*base, *given]})
    taken = {m["destination"] for m in user}
    out = [m for m in defaults if m["destination"] not in taken] + user
    return sorted(out, key=lambda m: len([p for p in m["destination"].split("/") if p]))


def _opposite(option: str) -> str:
    return {"rw": "ro", "noexec": "exec", "nosuid": "suid", "nodev": "dev"}.get(option, option)


def stub_targets(opts: RunOptions, binds: Sequence[Bind]) -> list[tuple[str, bool]]:
    """Mount targets the rootfs must have: ``(path, is_dir)`` for /proc, /dev, /sys and every
    bind and tmpfs not below another mount (those the runtime makes inside that mount)."""
    targets: list[tuple[str, bool]] = [(p, True) for p in KERNEL_MOUNTS]
    user: list[tuple[str, bool]] = [(b.destination, os.path.isdir(b.source)) for b in binds]
    user += [(v.destination, os.path.isdir(v.source)) for v in opts.volumes]
    user += [(t.destination, True) for t in opts.tmpfs]
    parents = [p for p, _ in targets]
    for path, is_dir in sorted(user, key=lambda t: t[0].count("/")):
        if path == "/":
            raise RunError("cannot mount over the container's root directory")
        if any(path == p or path.startswith(p.rstrip("/") + "/") for p in parents):
            continue
        targets.append((path, is_dir))
        parents.append(path)
    return targets


def host_devices() -> list[dict[str, Any]]:
    """The character and block devices of the host's /dev (``--privileged``)."""
    out: list[dict[str, Any]] = []
    for top, dirs, files in os.walk("/dev"):
        dirs[:] = [d for d in dirs if os.path.join(top, d) not in
                   ("/dev/pts", "/dev/shm", "/dev/mqueue")]
        for name in files:
            path = os.path.join(top, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            kind = "c" if stat.S_ISCHR(st.st_mode) else "b" if stat.S_ISBLK(st.st_mode) else ""
            if not kind or path in ("/dev/console", "/dev/ptmx", "/dev/tty"):
                continue
            out.append({"path": path, "type": kind, "major": os.major(st.st_rdev),
                        "minor": os.minor(st.st_rdev), "fileMode": stat.S_IMODE(st.st_mode),
                        "uid": st.st_uid, "gid": st.st_gid})
    return out


def spec(config: Mapping[str, Any], opts: RunOptions, *, rootfs: str, user: ExecUser,
         hostname: str, workdir: str, binds: Sequence[Bind], seccomp: dict[str, Any] | None,
         cgroups_path: str | None, cgroup_namespace: bool) -> dict[str, Any]:
    """The ``config.json`` of the run (OCI runtime spec 1.0)."""
    caps = capabilities(opts)
    root_user = user.uid == 0
    # podman: a non-root user gets only the capabilities it was given explicitly
    added = [c for c in (cap_name(x) for x in opts.cap_add) if c in caps]
    active = caps if root_user or opts.privileged else added
    process: dict[str, Any] = {
        "terminal": opts.tty,
        "user": {"uid": user.uid, "gid": user.gid,
                 **({"additionalGids": list(user.additional_gids)}
                    if user.additional_gids else {})},
        "args": command_line(config, opts),
        "env": environment(config, opts, user, hostname),
        "cwd": workdir,
        "capabilities": {"bounding": caps, "effective": active, "permitted": active,
                         "inheritable": [], **({"ambient": active} if not root_user else {})},
        "noNewPrivileges": opts.no_new_privileges,
    }
    if opts.tty and opts.console_size:
        process["consoleSize"] = {"height": opts.console_size[0],
                                  "width": opts.console_size[1]}
    namespaces = [{"type": t} for t in ("pid", "ipc", "uts", "mount")]
    if opts.network != "host":
        namespaces.append({"type": "network"})
    if cgroup_namespace:
        namespaces.append({"type": "cgroup"})
    linux: dict[str, Any] = {
        "namespaces": namespaces,
        "resources": {"devices": [{"allow": opts.privileged, "access": "rwm"}]},
    }
    if cgroups_path:
        linux["cgroupsPath"] = cgroups_path
    if opts.privileged:
        linux["devices"] = host_devices()
    else:
        linux["maskedPaths"] = list(MASKED_PATHS)
        linux["readonlyPaths"] = list(READONLY_PATHS)
    if opts.network != "host":
        # docker 20.10+: binding low ports and ping need no capability in a private network
        linux["sysctl"] = {"net.ipv4.ip_unprivileged_port_start": "0",
                           "net.ipv4.ping_group_range": "0 2147483647"}
    if seccomp is not None and not opts.privileged:
        linux["seccomp"] = seccomp
    out: dict[str, Any] = {
        "ociVersion": "1.0.2",
        "process": process,
        "root": {"path": rootfs, "readonly": opts.read_only},
        "hostname": hostname,
        "mounts": mounts(opts, binds),
        "linux": linux,
    }
    if opts.annotations:
        out["annotations"] = dict(opts.annotations)
    return out


def hosts_file(hostname: str, network: str) -> bytes:
    """``/etc/hosts``: the host's own with ``--network host``, docker's default otherwise."""
    if network == "host":
        try:
            with open("/etc/hosts", "rb") as f:
                return f.read()
        except OSError:
            pass
    lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback",
             "fe00::0\tip6-localnet", "ff00::0\tip6-mcastprefix", "ff02::1\tip6-allnodes",
             "ff02::2\tip6-allrouters"]
    if network != "host":
        lines.append(f"127.0.0.1\t{hostname}")
    return ("\n".join(lines) + "\n").encode()


def etc_files(directory: str, hostname: str, network: str) -> list[Bind]:
    """``/etc/hosts``, ``/etc/hostname`` (and the host's ``/etc/resolv.conf`` with
    ``--network host``) written as files of ``directory``, to be bind-mounted."""
    files: dict[str, bytes] = {"hosts": hosts_file(hostname, network),
                               "hostname": hostname.encode() + b"\n"}
    if network == "host":
        try:
            with open("/etc/resolv.conf", "rb") as f:
                files["resolv.conf"] = f.read()
        except OSError:
            files["resolv.conf"] = b""
    binds = []
    for name, data in files.items():
        path = os.path.join(directory, name)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.rename(tmp, path)
        binds.append(Bind(path, "/etc/" + name))
    return binds


def valid_hostname(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9]([A-Za-z0-9.-]{0,62})", name):
        raise RunError(f"invalid hostname {name!r}")
    return name
