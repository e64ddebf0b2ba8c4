"""``strata build``: a Dockerfile, its build context and options in; an image out.

``build(store, context, ...)`` parses the Dockerfile (``dockerfile``), reads ``.dockerignore``
(``ignore``), evaluates the ARGs before the first FROM with ``--build-arg`` values and the
predefined ones, works out which stages the target needs (its FROM and the ``COPY --from`` of
every stage it needs, by name or index: other stages are not built), builds those in order
(``stage.StageBuilder``) and tags the target's image.  Progress goes to a callback as
``BuildEvent`` values (the CLI prints them like BuildKit's plain progress: each step, ``CACHED``
or ``DONE`` with its time, RUN output lines).

Build arguments, as docker has them: a ``--build-arg`` sets an ARG of that name where one is
declared (before the first FROM for FROM lines, in a stage for its steps); an ARG without a
value in a stage takes the global one; one that no ARG declares is warned about
(``[Warning] One or more build-args [X] were not consumed``), except the predefined proxy
variables, which RUN sees without a declaration and which never enter history or the cache.
``TARGETPLATFORM``, ``TARGETOS``, ``TARGETARCH``, ``TARGETVARIANT`` and their ``BUILD*``
counterparts are predefined in the global scope (the host's platform).

Seams: ``Store.build`` (``api.py``) holds ``gc.ingesting`` around the whole build, so what it
stores is collected if it fails; the steps' images and the cache are ``records``.

Caveats:
* Builds for the host's platform only; ``FROM --platform`` must name it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import oci
from ..errors import ImageNotFound
from ..images import Image
from ..reference import Reference
from .addurl import Downloads
from .dockerfile import BuildFileError, Dockerfile, Stage
from .ignore import Matcher, read_patterns
from .records import StepImages
from .shell import ShellError, expand
from .sources import HostTree
from .stage import PROXY_ARGS, StageBuilder, StageMount

if TYPE_CHECKING:
    from ..api import Store

__all__ = ["BuildEvent", "BuildProgress", "Builder"]


@dataclass(frozen=True)
class BuildEvent:
    """One thing a build tells.

    ``kind``: ``"step"`` (a step starts; ``text`` says which, ``[stage 2/5] COPY . /app``),
    ``"cached"`` (the step was found in the cache), ``"output"`` (a line a RUN printed;
    ``seconds`` since the step started), ``"done"`` (the step ran; ``seconds`` it took),
    ``"error"`` (the step failed; ``text`` says why), ``"warning"``, ``"image"`` (the image
    built; ``text`` its ID), ``"tag"`` (``text``: a name given to it).  ``step`` numbers the
    steps of the build from 1 (0 for events about the whole build)."""

    kind: str
    step: int = 0
    text: str = ""
    seconds: float | None = None


BuildProgress = Callable[[BuildEvent], None]


def _ignore(event: BuildEvent) -> None:
    pass


def platform_args(p: oci.Platform) -> dict[str, str]:
    out = {}
    for prefix in ("TARGET", "BUILD"):
        out[prefix + "PLATFORM"] = str(p)
        out[prefix + "OS"] = p.os
        out[prefix + "ARCH"] = p.architecture
        out[prefix + "VARIANT"] = p.variant
    return out


class Builder:
    """The state of one build: options, the global ARGs, the results of the stages built."""

    def __init__(self, store: Store, df: Dockerfile, context: str, *,
                 build_args: Mapping[str, str] = {}, target: str | None = None,
                 no_cache: bool = False, pull: bool = False,
                 labels: Mapping[str, str] = {}, network: str = "host",
                 progress: BuildProgress | None = None) -> None:
        self.store = store
        self.df = df
        self.context = os.path.abspath(context)
        self.build_args = dict(build_args)
        self.no_cache = no_cache
        self.pull = pull
        self.labels = dict(labels)
        self.network = network
        self.events = progress or _ignore
        self.platform = oci.host_platform()
        self.images = StepImages(store)
        self.consumed: set[str] = set()
        self.results: dict[int, Image | None] = {}
        self.pulled: dict[str, Image] = {}
        self.step_no = 0
        self.closing: list[threading.Thread] = []
        self.downloads = Downloads(store.layers.tmp_dir)
        self.context_tree = HostTree(self.context, Matcher(self._ignore_patterns()))
        self.meta: dict[str, str | None] = {}
        self._meta_args()
        if target is not None:
            found = df.stage(target)
            if found is None:
                raise BuildFileError(f"failed to reach build target {target} in "
                                     f"{df.name}: no stage of that name")
            self.target = found
        else:
            self.target = df.stages[-1]

    def _ignore_patterns(self) -> list[str]:
        try:
            with open(os.path.join(self.context, ".dockerignore"), encoding="utf-8",
                      errors="replace") as f:
                return read_patterns(f.read())
        except FileNotFoundError:
            return []

    def _meta_args(self) -> None:
        env = platform_args(self.platform)
        self.meta.update(env)
        for inst in self.df.meta_args:
            where = f"{self.df.name}:{inst.line}"
            for a in inst.args:
                name, eq, default = a.partition("=")
                value: str | None = None
                if eq:
                    value = self._expand(default, where)
                if name in self.build_args:
                    value = self.build_args[name]
                    self.consumed.add(name)
                self.meta[name] = value

    def _expand(self, word: str, where: str) -> str:
        env = {k: v for k, v in self.meta.items() if v is not None}
        try:
            return expand(word, env, self.df.escape)
        except ShellError as exc:
            raise BuildFileError(f"{where}: {exc}") from None

    def expand_meta(self, word: str, where: str) -> str:
        """A FROM line's words: only the global ARGs substitute there."""
        return self._expand(word, where)

    # -- events -------------------------------------------------------------------------------

    def step_start(self, text: str) -> int:
        self.step_no += 1
        self.events(BuildEvent("step", self.step_no, text))
        return self.step_no

    def step_cached(self, step: int) -> None:
        self.events(BuildEvent("cached", step))

    def step_done(self, step: int, seconds: float) -> None:
        self.events(BuildEvent("done", step, seconds=seconds))

    def step_error(self, step: int, text: str) -> None:
        self.events(BuildEvent("error", step, text))

    def output(self, step: int, line: str, seconds: float) -> None:
        self.events(BuildEvent("output", step, line, seconds))

    def close_later(self, mount: StageMount) -> None:
        """Take a stage's mount down in a thread of its own (``run`` waits for it at the
        end): the unmount and the daemon's exit overlap with the work that follows."""
        t = threading.Thread(target=mount.close, name="strata-build-unmount")
        t.start()
        self.closing.append(t)

    def warn(self, text: str) -> None:
        self.events(BuildEvent("warning", 0, text))

    # -- stages -------------------------------------------------------------------------------

    def _ref_stage(self, name: str, before: int, by_index: bool) -> Stage | None:
        low = name.lower()
        for st in self.df.stages[:before]:
            if st.name == low:
                return st
        if by_index and name.isdigit() and int(name) < before:
            return self.df.stages[int(name)]
        return None

    def stage_result(self, name: str, current: Stage, copy_from: bool = False
                     ) -> tuple[Image | None, str] | None:
        """The image of an earlier stage ``name`` (by index too for ``COPY --from``), with
        how to name it; None when no earlier stage has that name."""
        st = self._ref_stage(name, current.index, copy_from)
        if st is None:
            return None
        if st.index not in self.results:
            raise BuildFileError(f"{self.df.name}:{current.line}: stage {name} was not built")
        return self.results[st.index], f"stage {st.ref}"

    def base_image(self, name: str, where: str) -> Image:
        """An image by name: from the store, pulled when missing (always with ``--pull``)."""
        if name in self.pulled:
            return self.pulled[name]
        image: Image | None = None
        if not self.pull:
            try:
                image = self.store.resolve(name)
            except ImageNotFound:
                image = None
        if image is None:
            start = time.monotonic()
            step = self.step_start(f"pull {name}")
            try:
                image = self.store.pull(name).image
            except Exception as exc:
                from ..errors import StoreError

                if isinstance(exc, StoreError):
                    raise BuildFileError(f"{where}: {name}: {exc}") from None
                raise
            self.step_done(step, time.monotonic() - start)
        self.pulled[name] = image
        return image

    def needed(self) -> list[Stage]:
        """The stages the target needs, in file order."""
        want: set[int] = set()
        todo = [self.target]
        while todo:
            st = todo.pop()
            if st.index in want:
                continue
            want.add(st.index)
            where = f"{self.df.name}:{st.line}"
            refs = [self.expand_meta(st.base, where)]
            for inst in st.instructions:
                src = inst.flag("from") if inst.cmd == "COPY" else None
                if src is not None:
                    try:
                        refs.append(self.expand_meta(src, f"{self.df.name}:{inst.line}"))
                    except BuildFileError:
                        refs.append(src)
                    dep = self._ref_stage(refs[-1], st.index, True)
                    if dep is None and self._ref_stage(refs[-1], len(self.df.stages), True):
                        raise BuildFileError(f"{self.df.name}:{inst.line}: COPY --from="
                                             f"{src} refers to a later stage")
            for ref in refs:
                dep = self._ref_stage(ref, st.index, ref is not refs[0])
                if dep is not None:
                    todo.append(dep)
        return [st for st in self.df.stages if st.index in want]

    def run(self) -> Image:
        stages = self.needed()
        try:
            for st in stages:
                sb = StageBuilder(self, st, len(self.df.stages))
                self.results[st.index] = sb.run()
        finally:
            try:
                self.downloads.close()
                self.images.flush()  # the steps that finished, also when one failed: the cache
            finally:
                for t in self.closing:  # no mount outlives the build
                    t.join()
        image = self.results[self.target.index]
        if image is None:
            raise BuildFileError(f"{self.df.name}:{self.target.line}: the target stage makes "
                                 "no image (FROM scratch and nothing else)")
        unused = sorted(k for k in self.build_args if k not in self.consumed
                        and k not in PROXY_ARGS and k not in self.meta)
        if unused:
            self.warn(f"One or more build-args [{' '.join(unused)}] were not consumed")
        return image

    def tag(self, image: Image, tags: Sequence[Reference]) -> None:
        self.events(BuildEvent("image", 0, image.id))
        for t in tags:
            self.store.tag(image, str(t))
            self.events(BuildEvent("tag", 0, str(t)))


def read_dockerfile(context: str, dockerfile: str | None, text: str | None) -> tuple[str, str]:
    """The Dockerfile's text and the name errors give it: ``text`` as given, else the file
    ``dockerfile`` (default ``CONTEXT/Dockerfile``)."""
    if text is not None:
        return text, "Dockerfile"
    path = dockerfile or os.path.join(context, "Dockerfile")
    try:
        with open(path, encoding="utf-8", errors="surrogateescape") as f:
            return f.read(), os.path.basename(path) if dockerfile is None else path
    except FileNotFoundError:
        raise BuildFileError(f"cannot read the Dockerfile: {path}: no such file") from None
    except IsADirectoryError:
        raise BuildFileError(f"cannot read the Dockerfile: {path}: is a directory") from None
    except OSError as exc:
        raise BuildFileError(f"cannot read the Dockerfile: {path}: {exc.strerror}") from None


def build(store: Store, context: str, *, dockerfile: str | None = None,
          dockerfile_text: str | None = None, tags: Sequence[Reference] = (),
          build_args: Mapping[str, str] = {}, target: str | None = None,
          no_cache: bool = False, pull: bool = False, labels: Mapping[str, str] = {},
          network: str = "host", progress: BuildProgress | None = None) -> Image:
    """Build the Dockerfile in ``context`` and tag the result (``Store.build``)."""
    from .. import gc
    from .dockerfile import parse

    if not os.path.isdir(context):
        raise BuildFileError(f"unable to prepare context: path {context!r} not found (the "
                             "build context must be a directory)")
    if network not in ("host", "none", "default"):
        raise BuildFileError(f"network mode {network!r} not supported (none or host)")
    text, name = read_dockerfile(context, dockerfile, dockerfile_text)
    df = parse(text, name)
    with gc.ingesting(store):
        b = Builder(store, df, context, build_args=build_args, target=target,
                    no_cache=no_cache, pull=pull, labels=labels,
                    network="host" if network == "default" else network, progress=progress)
        image = b.run()
        b.tag(image, tags)
    return store.image(image.id)
