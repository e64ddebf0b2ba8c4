"""A deterministic PAX tar writer (layers, exports, archives).

Headers are ustar with PAX extended records only where ustar cannot say it: long or non-ASCII
names and link targets, numbers too large for octal fields, and xattrs as ``SCHILY.xattr.*``
with their raw bytes.  Times are whole seconds; atime/ctime are never written; uname/gname are
empty.  The same entries therefore always give the same bytes.

Caveats:
* Names are ``str`` with surrogate escapes (undecodable bytes survive via ``os.fsencode``); a
  name that is not valid UTF-8 is written with ``hdrcharset=BINARY``.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

BLOCK = 512
REG, LINK, SYMLINK, CHR, BLK, DIR, FIFO = b"0", b"1", b"2", b"3", b"4", b"5", b"6"

_TYPE_OF_MODE = {
    stat.S_IFREG: REG, stat.S_IFLNK: SYMLINK, stat.S_IFCHR: CHR, stat.S_IFBLK: BLK,
    stat.S_IFDIR: DIR, stat.S_IFIFO: FIFO,
}


def typeflag_for(mode: int) -> bytes:
    try:
        return _TYPE_OF_MODE[stat.S_IFMT(mode)]
    except KeyError:
        raise ValueError(f"cannot archive file type {oct(stat.S_IFMT(mode))}") from None


@dataclass
class TarEntry:
    name: str
    typeflag: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0
    size: int = 0
    mtime: int = 0
    linkname: str = ""
    devmajor: int = 0
    devminor: int = 0
    xattrs: Mapping[str, bytes] = field(default_factory=dict)


def _pax_record(key: str, value: bytes) -> bytes:
    body = b" " + key.encode() + b"=" + value + b"\n"
    n = len(body) + 1
    while len(str(n)) + len(body) != n:
        n = len(str(n)) + len(body)
    return str(n).encode() + body


def _octal(value: int, width: int) -> bytes | None:
    text = f"{value:0{width - 1}o}"
    return text.encode() + b"\0" if len(text) == width - 1 and value >= 0 else None


def _encode_header(e: TarEntry, name: bytes, link: bytes) -> tuple[bytes, list[bytes]]:
    pax: list[bytes] = []
    if len(name) > 100 or not name.isascii():
        pax.append(_pax_record("path", name))
        name = name[:100]
    if len(link) > 100 or not link.isascii():
        pax.append(_pax_record("linkpath", link))
        link = link[:100]
    nums = []
    for key, value, width in (("mode", e.mode & 0o7777, 8), ("uid", e.uid, 8),
                              ("gid", e.gid, 8), ("size", e.size, 12), ("mtime", e.mtime, 12)):
        enc = _octal(value, width)
        if enc is None:
            if key == "mode":
                raise ValueError(f"invalid mode for {e.name!r}")
            pax.append(_pax_record(key, str(value).encode()))
            enc = _octal(0, width)
        assert enc is not None
        nums.append(enc)
    dev = [_octal(e.devmajor, 8) or _octal(0, 8), _octal(e.devminor, 8) or _octal(0, 8)]
    for key in sorted(e.xattrs):
        pax.append(_pax_record("SCHILY.xattr." + key, e.xattrs[key]))
    buf = bytearray(BLOCK)
    buf[0:100] = name.ljust(100, b"\0")
    buf[100:108], buf[108:116], buf[116:124] = nums[0], nums[1], nums[2]
    buf[124:136], buf[136:148] = nums[3], nums[4]
    buf[148:156] = b" " * 8
    buf[156:157] = e.typeflag
    buf[157:257] = link.ljust(100, b"\0")
    buf[257:263] = b"ustar\0"
    buf[263:265] = b"00"
    buf[329:337], buf[337:345] = dev[0], dev[1]  # type: ignore[assignment]
    buf[148:156] = b"%06o\0 " % sum(buf)
    return bytes(buf), pax


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


class TarWriter:
    """Writes entries to ``sink`` (a callable taking bytes); ``close`` writes the end marker."""

    def __init__(self, sink: Callable[[bytes], object]) -> None:
        self._sink = sink
        self.bytes_written = 0

    def _out(self, data: bytes) -> None:
        self._sink(data)
        self.bytes_written += len(data)

    def add(self, e: TarEntry, data: Iterable[bytes] = ()) -> None:
        """Write one entry; ``data`` must yield exactly ``e.size`` bytes for regular files."""
        name = os.fsencode(e.name)
        if e.typeflag == DIR and not name.endswith(b"/"):
            name += b"/"
        link = os.fsencode(e.linkname)
        header, pax = _encode_header(e, name, link)
        if pax:
            if not (_is_utf8(name) and _is_utf8(link)):
                pax.insert(0, _pax_record("hdrcharset", b"BINARY"))
            body = b"".join(pax)
            xname = b"PaxHeaders/" + os.path.basename(name.rstrip(b"/"))[:80]
            xh, _ = _encode_header(
                TarEntry(name="", typeflag=b"x", mode=0o644, size=len(body), mtime=e.mtime),
                xname, b"")
            self._out(xh)
            self._out(body + b"\0" * (-len(body) % BLOCK))
        self._out(header)
        if e.typeflag != REG:
            return
        written = 0
        for chunk in data:
            written += len(chunk)
            if written > e.size:
                raise ValueError(f"{e.name!r} grew while being archived")
            self._out(chunk)
        if written != e.size:
            raise ValueError(f"{e.name!r} has {written} bytes, expected {e.size}")
        if e.size % BLOCK:
            self._out(b"\0" * (BLOCK - e.size % BLOCK))

    def close(self) -> None:
        self._out(b"\0" * (2 * BLOCK))
