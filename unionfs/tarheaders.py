"""Reading tar headers that may lie: ``CheckedTarInfo`` and ``tar_errors``.

Python's ``tarfile`` trusts the headers it reads.  A hostile archive can make it step back
and read the same headers forever (a negative size), read a huge extended header into memory,
recurse without end (chained extended headers), or raise ValueError, ArithmeticError and
RecursionError that are not ``TarError``.  ``CheckedTarInfo`` (passed as ``tarinfo=``) refuses
such headers; ``tar_errors`` turns whatever tarfile raises into ``LayerError``.  Used by the
layer indexer (tarlayer) and, re-exported from there, by the image archive reader.

Caveats:
* ``_proc_member`` is tarfile's documented hook for subclasses; ``_proc_sparse`` and
  ``_proc_gnusparse_10`` copy tarfile's (3.11) parsers with bounds added.
"""

from __future__ import annotations

import contextlib
import tarfile
from collections.abc import Iterator

EXT_HEADER_LIMIT = 16 << 20  # a PAX or GNU long-name header larger than this is hostile
MAX_SPARSE = 1 << 16  # entries of one file's sparse map
_EXTENSIONS = (tarfile.XHDTYPE, tarfile.XGLTYPE, tarfile.SOLARIS_XHDTYPE,
               tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK)


class LayerError(ValueError):
    """A layer tar that cannot be served safely or correctly (see tarlayer's docstring)."""


class CheckedTarInfo(tarfile.TarInfo):
    """``tarfile``'s member parsing plus the checks it lacks against lying headers: no
    negative size (tarfile would step back and read the same headers again, forever), no
    extended header larger than ``EXT_HEADER_LIMIT`` (tarfile reads it into memory), no
    member whose next header is not after it.  Violations raise ``tarfile.HeaderError``.
    (``_proc_member`` is tarfile's documented hook for subclasses.)"""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        if self.size < 0:
            raise tarfile.HeaderError(f"negative size in the header at offset {self.offset}")
        if self.type in _EXTENSIONS and self.size > EXT_HEADER_LIMIT:
            raise tarfile.HeaderError(f"extended header of {self.size} bytes at offset "
                                      f"{self.offset}")
        start = self.offset
        member: tarfile.TarInfo = super()._proc_member(tarfile_)  # type: ignore[misc]
        if member.size < 0:
            raise tarfile.HeaderError(f"negative size for {member.name!r}")
        if tarfile_.offset <= start:
            raise tarfile.HeaderError(f"the header at offset {start} points backwards")
        return member

    def _proc_sparse(self, tarfile_: tarfile.TarFile) -> tarfile.TarInfo:
        """Old GNU sparse member: tarfile's loop over extension blocks, bounded."""
        structs, isextended, origsize = self._sparse_structs  # type: ignore[attr-defined]
        del self._sparse_structs  # type: ignore[attr-defined]
        f = tarfile_.fileobj
        assert f is not None
        while isextended:
            buf = f.read(tarfile.BLOCKSIZE)
            if len(buf) < tarfile.BLOCKSIZE:
                raise tarfile.HeaderError("truncated sparse header")
            for pos in range(0, 21 * 24, 24):
                try:
                    offset = tarfile.nti(buf[pos:pos + 12])  # type: ignore[attr-defined]
                    numbytes = tarfile.nti(buf[pos + 12:pos + 24])  # type: ignore[attr-defined]
                except ValueError:
                    break
                if offset and numbytes:
                    structs.append((offset, numbytes))
            if len(structs) > MAX_SPARSE:
                raise tarfile.HeaderError(f"sparse map of more than {MAX_SPARSE} runs")
            isextended = bool(buf[504])
        self.sparse = structs
        self.offset_data = f.tell()
        tarfile_.offset = self.offset_data + self._block(self.size)  # type: ignore[attr-defined]
        self.size = origsize
        return self

    def _proc_gnusparse_10(self, next: tarfile.TarInfo, pax_headers: dict[str, str],
                           tarfile_: tarfile.TarFile) -> None:
        """GNU sparse 1.0 (the map at the start of the data): tarfile's parser, bounded."""
        f = tarfile_.fileobj
        assert f is not None
        fields, _, buf = f.read(tarfile.BLOCKSIZE).partition(b"\n")
        count = int(fields)
        if not 0 <= count <= MAX_SPARSE:
            raise tarfile.HeaderError(f"sparse map of {count} runs")
        numbers: list[int] = []
        while len(numbers) < count * 2:
            if b"\n" not in buf:
                more = f.read(tarfile.BLOCKSIZE)
                if not more or len(buf) > 4096:
                    raise tarfile.HeaderError("truncated or malformed sparse map")
                buf += more
                continue
            number, _, buf = buf.partition(b"\n")
            numbers.append(int(number))
        next.offset_data = f.tell()
        next.sparse = list(zip(numbers[::2], numbers[1::2], strict=True))  # type: ignore[assignment]


@contextlib.contextmanager
def tar_errors() -> Iterator[None]:
    """What tarfile raises on hostile input, as LayerError: its own errors, and the
    ValueError, ArithmeticError and RecursionError (chained extended headers) it lets out."""
    try:
        yield
    except LayerError:
        raise
    except tarfile.TarError as exc:
        raise LayerError(f"not a valid tar archive: {exc}") from None
    except UnicodeError as exc:
        raise LayerError(f"undecodable tar header: {exc}") from None
    except (ValueError, ArithmeticError) as exc:
        raise LayerError(f"not a valid tar archive: bad header field ({exc})") from None
    except RecursionError:
        raise LayerError("not a valid tar archive: too many chained extended headers") from None
