"""RFC 3339 timestamps as images carry them (UTC, nanoseconds, ``Z``)."""

from __future__ import annotations

import os
import re
import time
from datetime import UTC, datetime

_RFC3339 = re.compile(
    r"^(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(?:\.(\d+))?(Z|z|[+-]\d{2}:\d{2})$"
)


def format_ns(ns: int) -> str:
    """``2024-01-02T03:04:05.123456789Z`` (fraction omitted when zero, trailing zeros cut)."""
    sec, frac = divmod(ns, 1_000_000_000)
    base = datetime.fromtimestamp(sec, UTC).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        return f"{base}.{frac:09d}".rstrip("0") + "Z"
    return base + "Z"


def now() -> str:
    return format_ns(time.time_ns())


def source_date_epoch() -> int | None:
    """``SOURCE_DATE_EPOCH`` in seconds when set (reproducible builds), else None."""
    raw = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise ValueError(f"SOURCE_DATE_EPOCH must be a number of seconds, got {raw!r}")
    return int(raw)


def parse(value: object) -> float | None:
    """Seconds since the epoch for an RFC 3339 string, or None if it is not one."""
    if not isinstance(value, str):
        return None
    m = _RFC3339.match(value.strip())
    if not m:
        return None
    day, clock, frac, zone = m.groups()
    tz = "+00:00" if zone in ("Z", "z") else zone
    try:
        dt = datetime.fromisoformat(f"{day}T{clock}{tz}")
    except ValueError:
        return None
    return dt.timestamp() + (float("0." + frac) if frac else 0.0)
