"""Layer descriptions: a lower layer as a JSON-able dict, and opening one by its ``kind``.

A mount spec (``unionfs.mount``) lists its layers this way, and ``imagestore.LayerStore``
describes every stored layer this way, so whoever opens a layer — the mount daemon, or the
store for export, diff and commit — opens it through ``open_layer`` and gets a ``LowerLayer``
without knowing its implementation.  Two kinds are built in::

    {"kind": "tar", "tar": PATH, "index": PATH, "name": "sha256:..."}   TarLayer
    {"kind": "dir", "path": PATH}                                       DirLayer

A description of another kind may name its opener, ``"opener": "module:function"`` (an entry
point's value: the store's own kinds do, which spares the daemon reading every installed
distribution's entry points, 15-25 ms of a lazy mount's start).  Other kinds are looked up in
the entry-point group ``strata.layers`` (``importlib.metadata``):
the entry point named like the kind is a callable taking the whole description and returning
a ``LowerLayer``.  That is the seam for layers ``unionfs`` knows nothing of (a layer fetched
lazily from a registry, a layer being built) without an import from ``unionfs`` to them; the
project declares its kinds in ``pyproject.toml`` (``[project.entry-points."strata.layers"]``)
and any installed distribution may add more.

Caveats:
* A description is trusted input (the store or the spawner wrote it): paths are used as
  given.  Its other keys belong to the kind.
* The entry points are read once per process (the daemon opens its layers once).
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable, Mapping
from typing import Any

from .layers import DirLayer, LowerLayer
from .tarheaders import LayerError
from .tarlayer import TarLayer

GROUP = "strata.layers"

Description = Mapping[str, Any]
Opener = Callable[[Description], LowerLayer]


def open_tar(desc: Description) -> LowerLayer:
    """``{"kind": "tar", "tar": PATH, "index": PATH, "name": NAME}``: an indexed layer tar."""
    return TarLayer.open(_field(desc, "tar"), _field(desc, "index"), name=desc.get("name", ""))


def open_dir(desc: Description) -> LowerLayer:
    """``{"kind": "dir", "path": PATH}``: a directory in overlayfs format, read-only."""
    return DirLayer(_field(desc, "path"))


BUILT_IN: dict[str, Opener] = {"tar": open_tar, "dir": open_dir}


def _field(desc: Description, key: str) -> str:
    value = desc.get(key)
    if not isinstance(value, str) or not value:
        raise LayerError(f"a {desc.get('kind')!r} layer description needs {key!r}")
    return value


@functools.cache
def installed() -> dict[str, Callable[[], Opener]]:
    """The kinds installed distributions declare in the ``strata.layers`` group: name ->
    a loader of the opener (loaded only when a layer of that kind is opened)."""
    from importlib.metadata import entry_points  # 10 ms: only when a foreign kind is asked

    return {ep.name: ep.load for ep in entry_points(group=GROUP)}


def opener(kind: str, registry: Mapping[str, Callable[[], Opener]] | None = None) -> Opener:
    """The opener of ``kind``: a built-in one, else the entry point of that name in
    ``registry`` (default: ``installed()``).  Raises ``LayerError`` for an unknown kind."""
    if kind in BUILT_IN:
        return BUILT_IN[kind]
    found = installed() if registry is None else registry
    load = found.get(kind)
    if load is None:
        known = ", ".join(sorted({*BUILT_IN, *found}))
        raise LayerError(f"unknown layer kind {kind!r} (known: {known}; others are added by "
                         f"installing a distribution with a {GROUP!r} entry point)")
    return load()


def open_layer(desc: Description,
               registry: Mapping[str, Callable[[], Opener]] | None = None) -> LowerLayer:
    """The ``LowerLayer`` ``desc`` describes (the caller closes it).  Raises ``LayerError``
    for a bad description, and whatever the kind's opener raises (``OSError`` for a missing
    file, ``LayerError`` for a bad index)."""
    kind = desc.get("kind")
    if not isinstance(kind, str):
        raise LayerError(f"a layer description needs a 'kind': {dict(desc)!r}")
    named = desc.get("opener")
    if isinstance(named, str) and kind not in BUILT_IN and registry is None:
        return _named(named)(desc)
    return opener(kind, registry)(desc)


def _named(ref: str) -> Opener:
    """The opener ``module:function`` (an entry point's value) a description names."""
    module, _, attr = ref.partition(":")
    try:
        found: Opener = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError) as exc:
        raise LayerError(f"layer opener {ref!r}: {exc}") from None
    return found
