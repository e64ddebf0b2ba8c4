"""The strata pytest plugin: real root filesystems from container images, in tests.

Installing strata registers it (entry point ``pytest11``: ``strata``); ``docs/testing.md`` is
the guide.  It provides:

* ``strata_store`` (session): an ``imagestore.Store`` in a temporary directory, or in
  ``--strata-root DIR`` (a store kept between sessions, e.g. a CI cache of pulled images).
* ``image_rootfs`` (session): a factory, image -> the path of its rootfs, mounted read-only
  once per session and unmounted when the session ends.  A name not in the store is pulled.
* ``container_rootfs`` (function): a factory, image -> ``ContainerRootfs``, a new container
  mounted writable for the test (``.path``, ``/``, ``.commit(ref)``, ``.diff()``,
  ``.run(command)`` through the OCI runtime as ``strata run``), unmounted and removed after
  it.
* the marker ``strata_fuse``: the test needs FUSE.  The two factories imply it.  When FUSE is
  unusable the test is skipped with the exact reason (``/dev/fuse is missing``,
  ``fusermount3 is not installed``, or the kernel's refusal of a probe mount), or fails with it
  under ``--strata-require-fuse``.

Mounts are taken down by fixture finalizers, which pytest runs also when a test fails and when
the session is interrupted (KeyboardInterrupt); the mount teardown itself holds a second
SIGINT until it is done.  Should pytest be killed (SIGKILL, SIGTERM), the daemons see their
lifeline pipe close and unmount on their own (see ``mounting``).

Caveats:
* The FUSE check mounts an empty directory once per session (about half a second), and only
  when a test asks for FUSE.
* A session that is killed runs no finalizer: its mounts go (lifeline), but with
  ``--strata-root`` the containers of the tests that were running stay in the store
  (``strata ps``, ``strata rm``).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import pytest

from .errors import FuseUnavailable, ImageNotFound, InvalidReference, MountFailed

if TYPE_CHECKING:  # the API is imported when a fixture is used, not when pytest starts
    from .api import Store
    from .containers import Container
    from .images import Image
    from .runner import RunResult

__all__ = ["ContainerFactory", "ContainerRootfs", "ImageRootfs", "require_fuse"]

# (verdict, message): ("ok", ""), ("skip", reason) or ("fail", error); absent until checked
_FUSE = pytest.StashKey[tuple[str, str]]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("strata", "strata: container image root filesystems")
    group.addoption("--strata-root", metavar="DIR", default=None,
                    help="image store of the strata_store fixture (default: a new temporary "
                         "store for the session)")
    group.addoption("--strata-require-fuse", action="store_true", default=False,
                    help="fail, instead of skipping, tests that need FUSE when it is "
                         "unavailable")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "strata_fuse: the test mounts file systems with strata (skipped, with the "
                   "reason, when FUSE is unavailable)")


@pytest.fixture(autouse=True)
def _strata_fuse_marker(request: pytest.FixtureRequest) -> None:
    """The ``strata_fuse`` marker (a fixture, so a skip names the test, not this line)."""
    if request.node.get_closest_marker("strata_fuse") is not None:
        require_fuse(request.config)


def _check_fuse(config: pytest.Config) -> tuple[str, str]:
    if _FUSE not in config.stash:
        from .api import Store
        from .mounting import fuse_missing

        verdict = ("ok", "")
        missing = fuse_missing()
        if missing:
            verdict = ("skip", missing)
        else:
            with tempfile.TemporaryDirectory(prefix="strata-probe-root-") as root:
                try:
                    Store(root).check_fuse()
                except FuseUnavailable as exc:
                    verdict = ("skip", str(exc))
                except MountFailed as exc:
                    verdict = ("fail", f"strata cannot mount: {exc}")
        config.stash[_FUSE] = verdict
    return config.stash[_FUSE]


def _unusable(config: pytest.Config, reason: str) -> NoReturn:
    if config.getoption("strata_require_fuse"):
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason)


def require_fuse(config: pytest.Config) -> None:
    """Skip the running test (fail it under ``--strata-require-fuse``) with the exact reason
    when FUSE mounts cannot work here; checked once per session."""
    verdict, message = _check_fuse(config)
    if verdict == "skip":
        _unusable(config, message)
    elif verdict == "fail":
        pytest.fail(message, pytrace=False)


def _image(store: Store, image: str | Image, pull: bool) -> Image:
    if not isinstance(image, str):
        return image
    try:
        return store.resolve(image)
    except ImageNotFound:
        if not pull:
            raise
        try:
            return store.pull(image).image
        except InvalidReference:
            raise ImageNotFound(f"No such image: {image}") from None


@pytest.fixture(scope="session")
def strata_store(request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Store:
    """The session's image store: ``--strata-root`` or a new temporary directory."""
    from .api import Store

    root = request.config.getoption("strata_root")
    return Store(str(root) if root else str(tmp_path_factory.mktemp("strata-store")))


class ImageRootfs:
    """``image_rootfs(image, pull=True) -> Path``: the image's rootfs, mounted read-only
    (once per session per image ID); a name the store lacks is pulled unless ``pull`` is
    false."""

    def __init__(self, store: Store, config: pytest.Config, stack: contextlib.ExitStack,
                 base: Path) -> None:
        self.store = store
        self._config, self._stack, self._base = config, stack, base
        self._mounted: dict[str, Path] = {}

    def __call__(self, image: str | Image, *, pull: bool = True) -> Path:
        require_fuse(self._config)
        img = _image(self.store, image, pull)
        if img.id not in self._mounted:
            try:
                path = self._stack.enter_context(
                    self.store.mount(img, self._base / img.short_id))
            except FuseUnavailable as exc:
                _unusable(self._config, str(exc))
            self._mounted[img.id] = path
        return self._mounted[img.id]


@pytest.fixture(scope="session")
def image_rootfs(strata_store: Store, request: pytest.FixtureRequest,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageRootfs]:
    """A factory: image -> the path of its rootfs, mounted read-only for the session."""
    require_fuse(request.config)
    with contextlib.ExitStack() as stack:
        yield ImageRootfs(strata_store, request.config, stack,
                          tmp_path_factory.mktemp("strata-images"))


class ContainerRootfs:
    """A container mounted writable for one test.  ``path`` is its root (also reached with
    ``rootfs / "etc/hosts"`` and ``os.fspath(rootfs)``); ``commit`` and ``diff`` act on it while
    it is mounted; ``run`` runs a program in it."""

    def __init__(self, store: Store, container: Container, path: Path,
                 mounts: contextlib.ExitStack | None = None) -> None:
        self.store, self.container, self.path = store, container, path
        self._mounts = mounts

    def __truediv__(self, other: str | os.PathLike[str]) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)

    def __repr__(self) -> str:
        return f"<ContainerRootfs {self.container.name} at {self.path}>"

    def commit(self, ref: str | None = None, **options: Any) -> Image:
        """``Store.commit`` of this container (paused while its layer is read); ``options``
        are that method's keyword arguments."""
        return self.store.commit(self.container, ref, **options)

    def diff(self) -> list[tuple[str, str]]:
        """``Store.diff`` of this container: ``[("A", "/path"), ...]``."""
        return self.store.diff(self.container)

    def run(self, command: str | Sequence[str] | None = None, **options: Any) -> RunResult:
        """``Store.run`` in this container (root and an OCI runtime needed): the program's
        exit status and output (``.status``, ``.stdout``, ``.stderr``); what it writes to
        the rootfs is under ``path`` afterwards.  The container is unmounted while the
        program runs (the runtime mounts it itself) and mounted again at ``path`` after it,
        so files opened below ``path`` before the call are stale.  ``options`` are those of
        ``Store.run`` (``env``, ``user``, ``workdir``, ``input``...)."""
        if self._mounts is not None:
            self._mounts.close()
        try:
            return self.store.run(self.container, command, capture_output=True, **options)
        finally:
            if self._mounts is not None:
                self._mounts.enter_context(self.store.mount(self.container, self.path))


class ContainerFactory:
    """``container_rootfs(image, name=None, pull=True) -> ContainerRootfs``: a new container
    of ``image``, mounted writable until the test ends, then unmounted and removed."""

    def __init__(self, store: Store, config: pytest.Config, stack: contextlib.ExitStack,
                 base: Path) -> None:
        self.store = store
        self._config, self._stack, self._base = config, stack, base

    def __call__(self, image: str | Image, *, name: str | None = None,
                 pull: bool = True) -> ContainerRootfs:
        require_fuse(self._config)
        img = _image(self.store, image, pull)
        container = self.store.create_container(img, name)
        self._stack.callback(self.store.remove_container, container, force=True)
        mounts = self._stack.enter_context(contextlib.ExitStack())
        try:
            path = mounts.enter_context(
                self.store.mount(container, self._base / container.short_id))
        except FuseUnavailable as exc:
            _unusable(self._config, str(exc))
        return ContainerRootfs(self.store, container, path, mounts)


@pytest.fixture
def container_rootfs(strata_store: Store, request: pytest.FixtureRequest,
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[ContainerFactory]:
    """A factory: image -> a new container mounted writable for this test (removed after)."""
    require_fuse(request.config)
    with contextlib.ExitStack() as stack:
        yield ContainerFactory(strata_store, request.config, stack,
                               tmp_path_factory.mktemp("strata-container"))
