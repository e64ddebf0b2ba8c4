"""What the metadata instructions do to an image config, and how history records each step.

``apply(cfg, inst, values)`` takes the ``config`` object of an image config (``Env``, ``Cmd``,
``Labels``...) and an instruction whose variables the builder has already substituted, and
returns the new object, as docker's classic builder writes it: ``ENV`` replaces or appends
``K=V`` in ``Env``; ``LABEL`` adds to ``Labels``; ``EXPOSE`` adds ``PORT/PROTO`` keys (ranges
expanded, ``tcp`` by default); ``VOLUME`` adds paths; ``USER``, ``WORKDIR`` (relative to the
previous one), ``STOPSIGNAL``, ``SHELL`` set theirs; ``CMD`` and ``ENTRYPOINT`` take the JSON form
as it is and wrap the shell form in the ``SHELL`` in force; an ``ENTRYPOINT`` clears a ``Cmd``
the stage inherited; ``HEALTHCHECK`` becomes ``{"Test": ["CMD-SHELL", ...]}`` (or ``CMD``,
``NONE``) with durations in nanoseconds; ``ONBUILD`` appends its trigger text.

``created_by`` strings follow the classic builder (and ``buildah bud``): metadata steps are
``/bin/sh -c #(nop) INSTRUCTION ...``, COPY/ADD ``/bin/sh -c #(nop) COPY file:<sha256> in DEST``,
RUN the command as run, after ``|N K=V ...`` when build arguments are in force.

Seams: pure functions on dicts; nothing is read or written.
"""

from __future__ import annotations

import copy
import json
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from ..instructions import InvalidChange, _duration, _stop_signal
from .dockerfile import BuildFileError, Instruction

__all__ = ["DEFAULT_SHELL", "NOP", "apply", "exposed_ports", "go_list", "healthcheck"]

DEFAULT_SHELL = ["/bin/sh", "-c"]
NOP = "/bin/sh -c #(nop) "


def go_list(items: Sequence[str]) -> str:
    """Go's ``%q`` of a ``[]string``: ``["a" "b c"]``."""
    return "[" + " ".join(json.dumps(x, ensure_ascii=False) for x in items) + "]"


def set_env(env: Sequence[str], key: str, value: str) -> list[str]:
    out = [e for e in env if e.partition("=")[0] != key]
    # docker keeps the variable where it was when it replaces one
    for i, e in enumerate(env):
        if e.partition("=")[0] == key:
            out = list(env)
            out[i] = f"{key}={value}"
            return out
    return [*out, f"{key}={value}"]


def exposed_ports(words: Sequence[str], where: str) -> list[str]:
    out: list[str] = []
    for w in words:
        port, _, proto = w.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise BuildFileError(f"{where}: invalid proto: {w.partition('/')[2]}")
        lo, dash, hi = port.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise BuildFileError(f"{where}: invalid containerPort: {port}")
        start, end = int(lo), int(hi) if dash else int(lo)
        if not 0 <= start <= end <= 65535:
            raise BuildFileError(f"{where}: invalid port range: {port}")
        out.extend(f"{p}/{proto}" for p in range(start, end + 1))
    return out


def healthcheck(inst: Instruction, shell: Sequence[str], where: str) -> dict[str, Any]:
    args = inst.args
    if args[0].upper() == "NONE":
        return {"Test": ["NONE"]}
    hc: dict[str, Any] = {}
    keys = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
            "start-interval": "StartInterval"}
    for name, value in inst.flags:
        assert value is not None
        if name in keys:
            try:
                ns = _duration(f"--{name}", value)
            except InvalidChange as exc:
                raise BuildFileError(f"{where}: {exc}") from None
            if 0 < ns < 10**6:
                raise BuildFileError(f"{where}: HEALTHCHECK --{name} cannot be less than 1ms")
            if ns:
                hc[keys[name]] = ns
        elif name == "retries":
            if not value.lstrip("-").isdigit():
                raise BuildFileError(f"{where}: HEALTHCHECK --retries must be a number")
            if int(value) < 0:
                raise BuildFileError(f"{where}: --retries cannot be negative ({value})")
            if int(value):
                hc["Retries"] = int(value)
    cmd = list(args[1:])
    test = ["CMD", *cmd] if inst.json else ["CMD-SHELL", cmd[0]]
    return {"Test": test, **hc}


def _command(inst: Instruction, shell: Sequence[str]) -> list[str]:
    return list(inst.args) if inst.json else [*shell, inst.args[0]]


def apply(cfg: Mapping[str, Any], inst: Instruction, values: Sequence[Any], *,
          cmd_set: bool, where: str) -> tuple[dict[str, Any], str]:
    """The container config after the metadata instruction ``inst`` (``values``: its
    arguments after substitution: ``(key, value)`` pairs for ENV and LABEL, words otherwise),
    and its history ``created_by``.  ``cmd_set``: a CMD came earlier in this stage."""
    out = copy.deepcopy(dict(cfg))
    shell = list(out.get("Shell") or DEFAULT_SHELL)
    cmd = inst.cmd
    if cmd == "ENV":
        env = list(out.get("Env") or [])
        for k, v in values:
            env = set_env(env, k, v)
        out["Env"] = env
        return out, NOP + "ENV " + " ".join(f"{k}={v}" for k, v in values)
    if cmd == "LABEL":
        labels = dict(out.get("Labels") or {})
        labels.update(dict(values))
        out["Labels"] = labels
        return out, NOP + "LABEL " + " ".join(f"{k}={v}" for k, v in values)
    if cmd == "EXPOSE":
        ports = dict(out.get("ExposedPorts") or {})
        ports.update({p: {} for p in exposed_ports(values, where)})
        out["ExposedPorts"] = ports
        return out, NOP + "EXPOSE " + " ".join(values)
    if cmd == "VOLUME":
        vols = dict(out.get("Volumes") or {})
        for v in values:
            if not v.strip():
                raise BuildFileError(f"{where}: VOLUME specified can not be an empty string")
            vols[v] = {}
        out["Volumes"] = vols
        return out, NOP + "VOLUME " + "[" + " ".join(values) + "]"
    if cmd == "USER":
        out["User"] = values[0]
        return out, NOP + "USER " + values[0]
    if cmd == "WORKDIR":
        out["WorkingDir"] = workdir(out.get("WorkingDir") or "", values[0])
        return out, NOP + "WORKDIR " + out["WorkingDir"]
    if cmd == "STOPSIGNAL":
        try:
            out["StopSignal"] = _stop_signal(values[0])
        except InvalidChange:
            raise BuildFileError(f"{where}: invalid signal: {values[0]}") from None
        return out, NOP + "STOPSIGNAL " + values[0]
    if cmd == "SHELL":
        out["Shell"] = list(inst.args)
        return out, NOP + "SHELL " + go_list(inst.args)
    if cmd == "CMD":
        out["Cmd"] = _command(inst, shell)
        return out, NOP + "CMD " + go_list(out["Cmd"])
    if cmd == "ENTRYPOINT":
        out["Entrypoint"] = _command(inst, shell) if inst.args else None
        if not cmd_set:
            out["Cmd"] = None
        return out, NOP + "ENTRYPOINT " + go_list(out["Entrypoint"] or [])
    if cmd == "HEALTHCHECK":
        out["Healthcheck"] = healthcheck(inst, shell, where)
        return out, NOP + "HEALTHCHECK " + go_list(out["Healthcheck"]["Test"])
    if cmd == "ONBUILD":
        out["OnBuild"] = [*(out.get("OnBuild") or []), inst.args[0]]
        return out, NOP + "ONBUILD " + inst.args[0]
    raise BuildFileError(f"{where}: {cmd} is not a metadata instruction")


def workdir(current: str, path: str) -> str:
    """docker's ``normalizeWorkdir``: relative to the current one, cleaned, absolute."""
    if not path.startswith("/"):
        path = posixpath.join(current or "/", path)
    return posixpath.normpath(path) if path != "/" else "/"
