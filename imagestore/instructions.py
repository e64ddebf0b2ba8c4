"""``--change`` instructions for import and commit, applied to an image's container config.

Accepted, as docker accepts them: CMD, ENTRYPOINT, ENV, EXPOSE, HEALTHCHECK, LABEL, ONBUILD,
STOPSIGNAL, USER, VOLUME, WORKDIR.  RUN, COPY, ADD and FROM are refused.  Exec form is parsed
as JSON; anything that is not a JSON array of strings is shell form (``/bin/sh -c``).  Values
are word-split with the Dockerfile quoting rules and ``$VAR``/``${VAR}``/``${VAR:-x}``/
``${VAR:+x}`` are expanded from the config's Env.

Caveats:
* ``ENTRYPOINT`` clears an inherited ``CMD`` unless a ``CMD`` change comes after it (the
  Dockerfile rule).
* The transform returns a new dict; the input config is never modified.
"""

from __future__ import annotations

import copy
import json
import re
import signal
from collections.abc import Sequence
from typing import Any

from .errors import StoreError


class InvalidChange(StoreError):
    """A ``--change`` value that is not an accepted instruction or does not parse."""


_REFUSED = ("RUN", "COPY", "ADD", "FROM")
_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_UNIT_NS = {"ns": 1, "us": 1_000, "µs": 1_000, "ms": 1_000_000, "s": 10**9, "m": 60 * 10**9,
            "h": 3600 * 10**9}


def _env_map(cfg: dict[str, Any]) -> dict[str, str]:
    out = {}
    for item in cfg.get("Env") or []:
        k, _, v = str(item).partition("=")
        out[k] = v
    return out


def _expand_var(text: str, i: int, env: dict[str, str]) -> tuple[str, int]:
    """Expand the variable starting after the ``$`` at ``text[i]``; return (value, next)."""
    if i < len(text) and text[i] == "{":
        end = text.find("}", i)
        if end < 0:
            raise InvalidChange(f"missing '}}' in {text!r}")
        body = text[i + 1 : end]
        for op in (":-", ":+"):
            if op in body:
                name, word = body.split(op, 1)
                val = env.get(name, "")
                if op == ":-":
                    return (val or word), end + 1
                return (word if val else ""), end + 1
        return env.get(body, ""), end + 1
    m = re.match(r"[A-Za-z_][A-Za-z0-9_]*", text[i:])
    if not m:
        return "$", i
    return env.get(m.group(0), ""), i + m.end()


def words(text: str, env: dict[str, str], expand: bool = True) -> list[str]:
    """Split ``text`` into words with Dockerfile quoting and variable expansion."""
    out: list[str] = []
    cur: list[str] = []
    in_word = False
    i = 0
    quote = ""
    while i < len(text):
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                cur.append(c)
            i += 1
            continue
        if c == "\\" and i + 1 < len(text):
            cur.append(text[i + 1])
            in_word = True
            i += 2
            continue
        if c == "$" and expand:
            val, i = _expand_var(text, i + 1, env)
            cur.append(val)
            in_word = True
            continue
        if quote == '"':
            if c == '"':
                quote = ""
            else:
                cur.append(c)
            i += 1
            continue
        if c in "'\"":
            quote = c
            in_word = True
        elif c.isspace():
            if in_word:
                out.append("".join(cur))
                cur, in_word = [], False
        else:
            cur.append(c)
            in_word = True
        i += 1
    if quote:
        raise InvalidChange(f"unterminated quote in {text!r}")
    if in_word:
        out.append("".join(cur))
    return out


def _pairs(instr: str, args: str, env: dict[str, str]) -> list[tuple[str, str]]:
    ws = words(args, env)
    if not ws:
        raise InvalidChange(f"{instr} requires at least one argument")
    if "=" not in ws[0]:
        if instr == "LABEL":
            raise InvalidChange(f"LABEL requires KEY=VALUE pairs, got {args!r}")
        # legacy "ENV KEY VALUE..." form
        key, _, rest = args.strip().partition(" ")
        return [(key, " ".join(words(rest, env)))]
    out = []
    for w in ws:
        key, eq, value = w.partition("=")
        if not eq or not key:
            raise InvalidChange(f"{instr} expects KEY=VALUE, got {w!r}")
        out.append((key, value))
    return out


def _command(args: str) -> list[str]:
    """Exec form (a JSON array of strings) or shell form."""
    stripped = args.strip()
    if stripped.startswith("["):
        try:
            value = json.loads(stripped)
        except ValueError:
            value = None
        if isinstance(value, list) and all(isinstance(x, str) for x in value):
            return value
    return ["/bin/sh", "-c", stripped]


def _duration(flag: str, text: str) -> int:
    if not _DURATION.match(text):
        raise InvalidChange(f"HEALTHCHECK {flag}: invalid duration {text!r}")
    return int(sum(float(n) * _UNIT_NS[u] for n, u in _DURATION_PART.findall(text)))


def _healthcheck(args: str) -> dict[str, Any]:
    rest = args.strip()
    if rest.upper() == "NONE":
        return {"Test": ["NONE"]}
    hc: dict[str, Any] = {}
    while rest.startswith("--"):
        flag, _, rest = rest.partition(" ")
        rest = rest.lstrip()
        name, eq, value = flag[2:].partition("=")
        if not eq:
            raise InvalidChange(f"HEALTHCHECK flag {flag} needs a value")
        keys = {"interval": "Interval", "timeout": "Timeout", "start-period": "StartPeriod",
                "start-interval": "StartInterval"}
        if name in keys:
            hc[keys[name]] = _duration(flag, value)
        elif name == "retries":
            if not value.isdigit():
                raise InvalidChange(f"HEALTHCHECK --retries must be a number, got {value!r}")
            hc["Retries"] = int(value)
        else:
            raise InvalidChange(f"unknown HEALTHCHECK flag {flag}")
    kind, _, cmd = rest.partition(" ")
    if kind.upper() != "CMD" or not cmd.strip():
        raise InvalidChange("HEALTHCHECK expects [OPTIONS] CMD command, or NONE")
    argv = _command(cmd)
    test = ["CMD-SHELL", argv[2]] if argv[:2] == ["/bin/sh", "-c"] else ["CMD", *argv]
    return {"Test": test, **hc}


def _ports(args: str, env: dict[str, str]) -> list[str]:
    out: list[str] = []
    for w in words(args, env):
        port, _, proto = w.partition("/")
        proto = (proto or "tcp").lower()
        if proto not in ("tcp", "udp", "sctp"):
            raise InvalidChange(f"invalid protocol in EXPOSE {w!r}")
        lo, dash, hi = port.partition("-")
        if not lo.isdigit() or (dash and not hi.isdigit()):
            raise InvalidChange(f"invalid port in EXPOSE {w!r}")
        start, end = int(lo), int(hi) if dash else int(lo)
        if not 0 < start <= end <= 65535:
            raise InvalidChange(f"invalid port range in EXPOSE {w!r}")
        out.extend(f"{p}/{proto}" for p in range(start, end + 1))
    return out


def _stop_signal(value: str) -> str:
    name = value.upper()
    if name.isdigit():
        return value
    if not name.startswith("SIG"):
        name = "SIG" + name
    if name not in signal.Signals.__members__ and not re.match(r"^SIGRTM(IN|AX)([+-]\d+)?$", name):
        raise InvalidChange(f"invalid STOPSIGNAL {value!r}")
    return value


def apply_changes(config: dict[str, Any], changes: Sequence[str]) -> dict[str, Any]:
    """Return a copy of the container ``config`` with ``changes`` applied in order."""
    cfg = copy.deepcopy(config)
    cmd_set = False
    for change in changes:
        instr, _, args = change.strip().partition(" ")
        args = args.strip()
        key = instr.upper()
        env = _env_map(cfg)
        if key in _REFUSED:
            raise InvalidChange(f"{instr.lower()} is not a valid change command")
        if not args and key not in ("CMD", "ENTRYPOINT"):
            raise InvalidChange(f"{key} requires an argument")
        if key == "CMD":
            cfg["Cmd"] = _command(args) if args else []
            cmd_set = True
        elif key == "ENTRYPOINT":
            cfg["Entrypoint"] = _command(args) if args else None
            if not cmd_set:
                cfg["Cmd"] = None
        elif key == "ENV":
            envs = list(cfg.get("Env") or [])
            for k, v in _pairs(key, args, env):
                envs = [e for e in envs if e.partition("=")[0] != k] + [f"{k}={v}"]
                env[k] = v
            cfg["Env"] = envs
        elif key == "LABEL":
            labels = dict(cfg.get("Labels") or {})
            labels.update(_pairs(key, args, env))
            cfg["Labels"] = labels
        elif key == "EXPOSE":
            ports = dict(cfg.get("ExposedPorts") or {})
            ports.update({p: {} for p in _ports(args, env)})
            cfg["ExposedPorts"] = ports
        elif key == "VOLUME":
            vols = dict(cfg.get("Volumes") or {})
            argv = _command(args)
            paths = argv if argv[:2] != ["/bin/sh", "-c"] else words(args, env)
            for v in paths:
                if not v:
                    raise InvalidChange("VOLUME specified can not be an empty string")
                vols[v] = {}
            cfg["Volumes"] = vols
        elif key == "USER":
            cfg["User"] = words(args, env)[0] if words(args, env) else ""
        elif key == "WORKDIR":
            wd = " ".join(words(args, env))
            if not wd.startswith("/"):
                wd = (cfg.get("WorkingDir") or "/").rstrip("/") + "/" + wd
            cfg["WorkingDir"] = wd
        elif key == "STOPSIGNAL":
            cfg["StopSignal"] = _stop_signal(" ".join(words(args, env)))
        elif key == "ONBUILD":
            trigger = args.split(None, 1)[0].upper()
            if trigger in ("ONBUILD", "FROM", "MAINTAINER"):
                raise InvalidChange(f"{trigger} isn't allowed as an ONBUILD trigger")
            cfg["OnBuild"] = [*(cfg.get("OnBuild") or []), args]
        elif key == "HEALTHCHECK":
            cfg["Healthcheck"] = _healthcheck(args)
        else:
            raise InvalidChange(f"unknown instruction: {instr}")
    return cfg
