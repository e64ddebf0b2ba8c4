"""Printing as docker prints: tables, human sizes and durations, ``--format`` templates.

Templates support the common subset of Go templates users pass to docker: ``{{.Field}}``,
``{{.A.B}}``, ``{{json .}}``, ``{{json .Field}}``, a leading ``table`` (prints a header row),
``\\t``/``\\n`` escapes, and the word ``json`` alone (one JSON object per line).
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from imagestore import timefmt

_UNITS = ("B", "kB", "MB", "GB", "TB", "PB", "EB", "ZB", "YB")
_FIELD = re.compile(r"\{\{\s*(json\s+)?\.([A-Za-z0-9_.]*)\s*\}\}")


def human_size(size: float) -> str:
    """go-units HumanSizeWithPrecision(size, 3): decimal units, 3 significant digits."""
    i = 0
    while size >= 1000 and i < len(_UNITS) - 1:
        size /= 1000
        i += 1
    return f"{size:.3g}{_UNITS[i]}"


def human_duration(seconds: float) -> str:
    """go-units HumanDuration."""
    s = int(seconds)
    if s < 1:
        return "Less than a second"
    if s == 1:
        return "1 second"
    if s < 60:
        return f"{s} seconds"
    minutes = round(seconds / 60)
    if minutes == 1:
        return "About a minute"
    if minutes < 60:
        return f"{minutes} minutes"
    hours = round(seconds / 3600)
    if hours == 1:
        return "About an hour"
    if hours < 48:
        return f"{hours} hours"
    if hours < 24 * 7 * 2:
        return f"{hours // 24} days"
    if hours < 24 * 30 * 2:
        return f"{hours // 24 // 7} weeks"
    if hours < 24 * 365 * 2:
        return f"{hours // 24 // 30} months"
    return f"{hours // 24 // 365} years"


def since(created: str) -> str:
    ts = timefmt.parse(created)
    if ts is None:
        return "N/A"
    return human_duration(max(0.0, time.time() - ts)) + " ago"


def _local(created: str) -> datetime | None:
    ts = timefmt.parse(created)
    return None if ts is None else datetime.fromtimestamp(int(ts)).astimezone()


def rfc3339(created: str) -> str:
    """Go's ``time.Unix(t, 0).Format(time.RFC3339)``: whole seconds, local time, ``Z`` for
    UTC (docker's ``history -H=false``)."""
    dt = _local(created)
    if dt is None:
        return ""
    text = dt.isoformat(timespec="seconds")
    return text[:-6] + "Z" if text.endswith("+00:00") else text


def go_time(created: str) -> str:
    """Go's ``time.Unix(t, 0).String()``: ``2024-01-02 03:04:05 +0000 UTC`` in local time
    (docker's ``CreatedAt`` of images)."""
    dt = _local(created)
    return "" if dt is None else dt.strftime("%Y-%m-%d %H:%M:%S %z %Z")


def table(rows: Sequence[Sequence[str]], out: Any = None) -> None:
    """docker's tabwriter (minwidth 10, padding 3); the last column is not padded."""
    out = out or sys.stdout
    if not rows:
        return
    ncol = len(rows[0])
    widths = [max(10, max(len(r[c]) for r in rows) + 3) for c in range(ncol - 1)]
    for r in rows:
        line = "".join(cell.ljust(widths[c]) for c, cell in enumerate(r[:-1])) + r[-1]
        print(line.rstrip() if not r[-1] else line, file=out)


def _lookup(obj: Any, dotted: str) -> Any:
    if not dotted:
        return obj
    for part in dotted.split("."):
        if isinstance(obj, Mapping):
            obj = obj.get(part, "")
        else:
            return ""
    return obj


def _plain(value: Any) -> str:
    if value is None:
        return "<no value>"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return "[" + " ".join(_plain(v) for v in value) + "]"
    if isinstance(value, dict):
        return "map[" + " ".join(f"{k}:{_plain(v)}" for k, v in sorted(value.items())) + "]"
    return str(value)


def render(template: str, obj: Mapping[str, Any]) -> str:
    text = template.replace("\\t", "\t").replace("\\n", "\n")

    def sub(m: re.Match[str]) -> str:
        value = _lookup(obj, m.group(2))
        if m.group(1):
            return json.dumps(value, separators=(",", ":"))
        return _plain(value)

    return _FIELD.sub(sub, text)


def print_formatted(template: str, objs: Sequence[Mapping[str, Any]],
                    headers: Mapping[str, str] | None = None) -> None:
    """Print ``objs`` with a ``--format`` value."""
    if template == "json":
        for o in objs:  # as Go marshals a map: sorted keys, <, > and & escaped
            text = json.dumps(o, separators=(",", ":"), sort_keys=True, ensure_ascii=False)
            for ch, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
                text = text.replace(ch, esc)
            print(text)
        return
    if template.startswith("table"):
        body = template[len("table"):].strip() or "\t".join(
            "{{." + k + "}}" for k in (headers or {}))
        header_row = _FIELD.sub(lambda m: (headers or {}).get(m.group(2), m.group(2).upper()),
                                body.replace("\\t", "\t"))
        rows = [header_row.split("\t")] + [render(body, o).split("\t") for o in objs]
        width = max(len(r) for r in rows)
        table([r + [""] * (width - len(r)) for r in rows])
        return
    for o in objs:
        print(render(template, o))
