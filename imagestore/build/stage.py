"""One stage of a build: FROM, then each instruction as a step, in one mount.

A step either hits the cache (``records.StepImages``: same parent image, same step text) or
runs.  Metadata instructions (ENV, LABEL, CMD...) only change the config; COPY, ADD, RUN and a
WORKDIR that has to create its directory change files.  Those run in the stage's mount
(``StageMount``), started at the first such step that misses the cache: a writable union of
the parent image's layers.  After the step the mount's upper is *rotated* (``mounts.rotate``:
it becomes the top read-only layer of the same mount, a fresh upper takes its place), and the
rotated upper is stored as the step's layer, as ``strata commit`` stores one.  So a stage of
twenty steps costs one mount, and a rebuild that changes nothing mounts nothing at all.

Seams: ``Builder`` (``builder.py``) gives the build-wide state (store, options, events, other
stages' results); ``copy`` and ``sources`` do COPY/ADD, ``metadata`` the config, ``runstep``
RUN, ``records`` the images and the cache.

Caveats:
* As root, the mount is made with ``allow_other`` and ``suid`` (the image's users must reach
  their files, a setuid program must work in RUN), never ``dev``.
* Directories the stage made in ``<root>/tmp/build-*`` are removed by the mount daemon when
  the mount ends, also when the build was killed (the daemon's lifeline).
"""

from __future__ import annotations

import copy
import json
import os
import posixpath
import tempfile
import time
from typing import TYPE_CHECKING, Any

from unionfs.resolve import UnionView

from .. import mounting
from ..errors import ImageNotFound, StoreError
from ..images import Image
from ..mounts import Mounts, rotate
from . import metadata, records
from .addurl import is_url
from .copy import CopyError, CopyOptions, DestRoot, copy_sources, lookup_owner, parse_chmod
from .dockerfile import BuildFileError, Instruction, Stage, parse_trigger
from .shell import ShellError, expand, expand_words
from .sources import HostTree, Source, ViewTree, checksum, find_sources

if TYPE_CHECKING:
    from .builder import Builder

__all__ = ["StageBuilder", "StageMount"]

PROXY_ARGS = ("HTTP_PROXY", "http_proxy", "HTTPS_PROXY", "https_proxy", "FTP_PROXY",
              "ftp_proxy", "NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy")


class StageMount:
    """A writable mount of an image's layers whose upper turns into a layer per step."""

    def __init__(self, b: Builder, image: Image | None, run: bool) -> None:
        store = b.store
        self.dir = tempfile.mkdtemp(dir=store.layers.tmp_dir, prefix="build-")
        self.n = 0
        self.image_id = image.id if image is not None else ""
        if image is not None and image.diff_ids:
            layers = store.layers.stack(image.diff_ids)
        else:
            empty = os.path.join(self.dir, "scratch")
            os.mkdir(empty)
            layers = [{"kind": "dir", "path": empty}]
        if run:  # RUN's mount targets the rootfs lacks, below the steps' layers
            from .runstep import write_init

            init = os.path.join(self.dir, "init")
            if write_init(store, image, init):
                layers = [{"kind": "dir", "path": init}, *layers]
        upper, work = self._pair()
        mp = os.path.join(self.dir, "rootfs")
        os.mkdir(mp)
        root = os.geteuid() == 0  # RUN needs root; a COPY-only build runs without
        plan = mounting.plan(store, mounting.Layers(tuple(layers), upper, work, self.dir), mp,
                             allow_other=root, suid=root)
        self.log = plan.log
        self._cm = mounting.mounted(plan)
        self.path = str(self._cm.__enter__())
        rec = Mounts(store.root).record_for(self.path)
        assert rec is not None and rec.control
        self.control = rec.control
        self.upper = upper

    def _pair(self) -> tuple[str, str]:
        upper = os.path.join(self.dir, f"upper-{self.n}")
        work = os.path.join(self.dir, f"work-{self.n}")
        os.mkdir(upper)
        os.mkdir(work)
        self.n += 1
        return upper, work

    def rotate(self) -> str:
        """Turn the upper into a read-only layer; returns its directory."""
        upper, work = self._pair()
        old = rotate(self.path, self.control, upper, work)
        self.upper = upper
        return old

    def close(self) -> None:
        self._cm.__exit__(None, None, None)
        try:  # the daemon's log, unless it says more than that it mounted
            with open(self.log, "rb") as f:
                quiet = all(line.startswith(b"INFO ") for line in f if line.strip())
            if quiet:
                os.unlink(self.log)
        except OSError:
            pass


class StageBuilder:
    """Builds one stage; ``run`` returns its image."""

    def __init__(self, b: Builder, stage: Stage, number: int) -> None:
        self.b = b
        self.stage = stage
        self.df = b.df
        self.image: Image | None = None
        self.doc: dict[str, Any] = {}
        self.author = ""
        self.args: dict[str, str | None] = {}
        self.cmd_set = False
        self.mount: StageMount | None = None
        self.number = number  # of stages being built, for the step labels
        self.steps: list[Instruction] = []

    # -- state -------------------------------------------------------------------------------

    @property
    def cfg(self) -> dict[str, Any]:
        c = self.doc.get("config")
        return c if isinstance(c, dict) else {}

    def env(self) -> dict[str, str]:
        """What variables substitute to: the stage's ARGs with values, then its ENV over them."""
        out = {k: v for k, v in self.args.items() if v is not None}
        for item in self.cfg.get("Env") or []:
            k, _, v = str(item).partition("=")
            out[k] = v
        return out

    def expand(self, word: str, where: str) -> str:
        try:
            return expand(word, self.env(), self.df.escape)
        except ShellError as exc:
            raise BuildFileError(f"{where}: {exc}") from None

    def expand_words(self, word: str, where: str) -> list[str]:
        try:
            return expand_words(word, self.env(), self.df.escape)
        except ShellError as exc:
            raise BuildFileError(f"{where}: {exc}") from None

    def _set_image(self, image: Image) -> None:
        self.image = image
        self.doc = copy.deepcopy(dict(image.config.data))

    # -- the stage ---------------------------------------------------------------------------

    def run(self) -> Image | None:
        try:
            self._from()
            triggers = list(self.cfg.get("OnBuild") or [])
            steps: list[Instruction] = []
            for text in triggers:
                steps.append(parse_trigger(text, self.df.name, self.stage.line))
            if triggers:
                self.cfg.pop("OnBuild", None)
            steps += self.stage.instructions
            if self.b.labels and self.stage is self.b.target:
                steps.append(Instruction("LABEL", (), original="LABEL", line=0))
            self.steps = steps
            total = len(steps) + 1
            for i, inst in enumerate(steps, start=2):
                self._step(inst, i, total)
            return self.image
        finally:
            if self.mount is not None:
                self.b.close_later(self.mount)  # while the images are recorded
                self.mount = None

    def label(self, i: int, total: int) -> str:
        name = self.stage.ref if self.number > 1 else ""
        return f"[{name + ' ' if name else ''}{i}/{total}]"

    def _from(self) -> None:
        stage = self.stage
        where = f"{self.df.name}:{stage.line}"
        total = len(stage.instructions) + 1 + (1 if self.b.labels and stage is self.b.target
                                               else 0)
        base = self.b.expand_meta(stage.base, where)
        if stage.platform is not None:
            wanted = self.b.expand_meta(stage.platform, where)
            if wanted not in (str(self.b.platform), f"{self.b.platform.os}/"
                              f"{self.b.platform.architecture}"):
                raise BuildFileError(f"{where}: FROM --platform={wanted}: strata builds for "
                                     f"the host's platform ({self.b.platform}) only")
        start = time.monotonic()
        step = self.b.step_start(f"{self.label(1, total)} FROM {base}" +
                                 (f" AS {stage.name}" if stage.name else ""))
        prior = self.b.stage_result(base, stage)
        if prior is not None:
            image: Image | None = prior[0]
        elif base.lower() == "scratch":
            image = None
        else:
            image = self.b.base_image(base, where)
        if image is None:
            self.doc = records.empty_config(self.b.platform)
        else:
            self._set_image(image)
        self.b.step_done(step, time.monotonic() - start)

    def _step(self, inst: Instruction, i: int, total: int) -> None:
        where = f"{self.df.name}:{inst.line}"
        title = f"{self.label(i, total)} {inst.original.splitlines()[0]}" if inst.line else \
            f"{self.label(i, total)} LABEL " + " ".join(f"{k}={v}" for k, v in
                                                         self.b.labels.items())
        step = self.b.step_start(title)
        start = time.monotonic()
        try:
            cached = self._dispatch(inst, where, step)
        except StoreError as exc:
            if not str(exc).startswith(f"{self.df.name}:"):
                exc.args = (f"{where}: {exc}",)  # the step's file and line, type kept
            self.b.step_error(step, str(exc))
            raise
        if cached:
            self.b.step_cached(step)
        else:
            self.b.step_done(step, time.monotonic() - start)

    def _commit_config(self, cfg: dict[str, Any], created_by: str, key_text: str) -> bool:
        """A step that changes the config only; True when the cache had it."""
        key = records.cache_key(self.image.id if self.image else "scratch", key_text)
        hit = None if self.b.no_cache else self.b.images.cached(key)
        parent = self.image.id if self.image else ""
        if hit is not None:
            if self.mount is not None and self.mount.image_id == parent:
                self.mount.image_id = hit.id  # the same files: only the config changed
            self._set_image(hit)
            return True
        doc = dict(self.doc)
        doc["config"] = cfg
        image = self.b.images.new_image(self.image, doc, created_by, None, key, self.author)
        if self.mount is not None and self.mount.image_id == parent:
            self.mount.image_id = image.id
        self._set_image(image)
        return False

    def _dispatch(self, inst: Instruction, where: str, step: int) -> bool:
        cmd = inst.cmd
        if cmd == "ARG":
            return self._arg(inst, where)
        if cmd == "MAINTAINER":
            self.author = inst.args[0]
            self.doc["author"] = self.author
            created_by = metadata.NOP + "MAINTAINER " + inst.args[0]
            return self._commit_config(self.cfg, created_by, created_by)
        if cmd in ("COPY", "ADD"):
            return self._copy(inst, where)
        if cmd == "RUN":
            from .runstep import run_step

            return run_step(self, inst, where, step)
        values: list[Any]
        if cmd == "LABEL" and inst.line == 0:
            values = list(self.b.labels.items())
        elif cmd in ("ENV", "LABEL"):
            values = [(self.expand(k, where), self.expand(v, where))
                      for k, v in zip(inst.args[::2], inst.args[1::2], strict=False)]
            if cmd == "LABEL" and any(not k for k, _ in values):
                raise BuildFileError(f"{where}: LABEL names can not be blank")
        elif cmd == "EXPOSE":
            values = [w for a in inst.args for w in self.expand_words(a, where)]
        elif cmd == "VOLUME":
            values = [self.expand(a, where) for a in inst.args] if inst.json else \
                [w for a in inst.args for w in self.expand_words(a, where)]
        elif cmd in ("USER", "WORKDIR", "STOPSIGNAL"):
            values = [self.expand(inst.args[0], where)]
        else:
            values = list(inst.args)
        cfg, created_by = metadata.apply(self.cfg, inst, values, cmd_set=self.cmd_set,
                                         where=where)
        if cmd == "CMD":
            self.cmd_set = True
        if cmd == "WORKDIR":
            return self._workdir(cfg, created_by)
        return self._commit_config(cfg, created_by, created_by)

    def _arg(self, inst: Instruction, where: str) -> bool:
        names = []
        for a in inst.args:
            name, eq, default = a.partition("=")
            value: str | None = None
            if eq:
                value = self.expand(default, where)
            if name in self.b.build_args:
                value = self.b.build_args[name]
            elif not eq and name in self.b.meta:
                value = self.b.meta[name]
            self.b.consumed.add(name)
            self.args[name] = value
            names.append(name + (f"={default}" if eq else ""))
        created_by = metadata.NOP + "ARG " + " ".join(names)
        return self._commit_config(self.cfg, created_by, created_by)

    # -- file steps --------------------------------------------------------------------------

    def ensure_mount(self) -> StageMount:
        if self.mount is not None and self.mount.image_id != (self.image.id if self.image
                                                              else ""):
            self.mount.close()
            self.mount = None
        if self.mount is None:
            self.mount = StageMount(self.b, self.image,
                                    run=any(inst.cmd == "RUN" for inst in self.steps))
        return self.mount

    def commit_files(self, created_by: str, key: str, cfg: dict[str, Any] | None = None
                     ) -> None:
        """The step ran in the mount: its upper becomes the step's layer (or none, when it
        changed nothing) and the step's image is recorded."""
        assert self.mount is not None
        old = self.mount.rotate()
        layer = records.commit_layer(self.b.store, old)
        doc = dict(self.doc)
        if cfg is not None:
            doc["config"] = cfg
        image = self.b.images.new_image(self.image, doc, created_by, layer, key, self.author)
        self.mount.image_id = image.id
        self._set_image(image)

    def cached_step(self, key: str) -> bool:
        hit = None if self.b.no_cache else self.b.images.cached(key)
        if hit is None:
            return False
        self._set_image(hit)
        return True

    def parent_id(self) -> str:
        return self.image.id if self.image is not None else "scratch"

    def _workdir(self, cfg: dict[str, Any], created_by: str) -> bool:
        key = records.cache_key(self.parent_id(), created_by)
        if self.cached_step(key):
            return True
        path = cfg["WorkingDir"]
        if self._is_dir(path):
            return self._commit_config(cfg, created_by, created_by)
        m = self.ensure_mount()
        root = DestRoot(m.path)
        root.mkdirs(root.locate(path), (0, 0))
        self.commit_files(created_by, key, cfg)
        return False

    def _is_dir(self, path: str) -> bool:
        """Is ``path`` a directory of the current image's rootfs (symlinks followed)?"""
        if self.mount is not None and self.mount.image_id == (self.image.id if self.image
                                                              else ""):
            return os.path.isdir(os.path.join(self.mount.path, DestRoot(self.mount.path)
                                              .locate(path)))
        if self.image is None:
            return path.strip("/") == ""
        from .sources import resolve

        with self.view() as tree:
            rel = resolve(tree, path.lstrip("/"))
            e = tree.entry(rel) if rel is not None else None
            return e is not None and e.is_dir

    def view(self, image: Image | None = None) -> _Viewed:
        return _Viewed(self.b, image or self.image)

    def _copy(self, inst: Instruction, where: str) -> bool:
        cmd = inst.cmd
        add = cmd == "ADD"
        chown = inst.flag("chown")
        chmod = inst.flag("chmod")
        src_from = inst.flag("from")
        checksum_flag = inst.flag("checksum")
        chown = self.expand(chown, where) if chown else None
        chmod_v = parse_chmod(self.expand(chmod, where)) if chmod else None
        heredocs = inst.heredocs
        marks = {f"<<{q}{h.name}{q}" for h in heredocs for q in ("", '"', "'")}
        marks |= {"<<-" + m[2:] for m in marks}
        args = [self.expand(a, where) if a not in marks else a for a in inst.args]
        dest = args[-1] if args else ""
        srcs = [a for a in args[:-1] if a not in marks]
        wd = self.cfg.get("WorkingDir") or "/"
        if not dest.startswith("/"):
            dest = posixpath.join(wd, dest) + ("/" if dest.endswith("/") else "")
        urls = [s for s in srcs if is_url(s)]
        if urls and not add:
            raise BuildFileError(f"{where}: COPY cannot take a URL ({urls[0]}): use ADD")
        if checksum_flag is not None and not (urls and add):
            raise BuildFileError(f"{where}: ADD --checksum needs a URL source")
        contents = [(h.name, self.expand(h.content, where) if h.expand else h.content)
                    for h in heredocs]
        with self._source_tree(src_from, where) as (tree, from_text):
            sources: list[Source] = []
            for s in srcs:
                if is_url(s):
                    continue
                sources += find_sources(tree, s, wildcards=True, what=cmd)
            if len(sources) + len(urls) + len(heredocs) > 1 and not dest.endswith("/"):
                raise CopyError(f"{cmd} failed: when using {cmd} with more than one source "
                                "file, the destination must be a directory and end with a /")
            text = self._copy_text(cmd, tree, sources, urls, dest, chown, chmod_v, from_text,
                                   contents, checksum_flag, where)
            key = records.cache_key(self.parent_id(), text)
            if self.cached_step(key):
                return True
            m = self.ensure_mount()
            root = DestRoot(m.path)
            owner = lookup_owner(root, chown) if chown else None
            opts = CopyOptions(owner, chmod_v, keep_owner=src_from is not None)
            if sources:
                copy_sources(tree, sources, root, dest, opts, add=add, what=cmd)
            if urls:
                self.b.downloads.add(urls, root, dest, opts, checksum_flag, where)
            if contents:
                self._heredoc_files(contents, root, dest, opts)
        self.commit_files(self._created_by(text), key)
        return False

    def _copy_text(self, cmd: str, tree: Any, sources: list[Source], urls: list[str],
                   dest: str, chown: str | None, chmod: int | None, from_text: str,
                   contents: list[tuple[str, str]], checksum_flag: str | None,
                   where: str) -> str:
        if len(sources) == 1 and not urls:
            kind = "dir" if sources[0].entry.is_dir else "file"
        else:
            kind = "multi"
        digest = checksum(tree, sources) if sources else ""
        if urls:
            digest = self.b.downloads.digests(urls, checksum_flag, where) + digest
        if contents:
            digest += json.dumps(contents)
        flags = "".join([f"--from={from_text} " if from_text else "",
                         f"--chown={chown} " if chown else "",
                         f"--chmod={chmod:o} " if chmod is not None else ""])
        return f"{cmd} {flags}{kind}:{digest} in {dest} "

    @staticmethod
    def _created_by(text: str) -> str:
        cmd, _, rest = text.partition(" ")
        while rest.startswith("--"):
            _, _, rest = rest.partition(" ")
        kind, _, tail = rest.partition(":")
        digest, _, dest = tail.partition(" in ")
        short = digest[:64] if len(digest) <= 64 else records.cache_key("", digest)[7:]
        return f"{metadata.NOP}{cmd} {kind}:{short} in {dest}"

    def _source_tree(self, src_from: str | None, where: str) -> _SourceTree:
        return _SourceTree(self, src_from, where)

    @staticmethod
    def _heredoc_files(contents: list[tuple[str, str]], root: DestRoot, dest: str,
                       opts: CopyOptions) -> None:
        for name, content in contents:
            target = dest + name if dest.endswith("/") else dest
            rel = root.locate(target, follow_last=False)
            root.mkdirs(posixpath.dirname(rel), opts.owner or (0, 0))
            with open(root.host(rel), "w") as f:
                f.write(content)
            os.chown(root.host(rel), *(opts.owner or (0, 0)))
            os.chmod(root.host(rel), opts.chmod if opts.chmod is not None else 0o644)


class _Viewed:
    """An image's rootfs as a source tree, its layers open for the ``with`` block."""

    def __init__(self, b: Builder, image: Image | None) -> None:
        self.b = b
        self.image = image
        self._cm: Any = None

    def __enter__(self) -> ViewTree:
        image = self.image
        assert image is not None
        self._cm = self.b.store.layers.opened(self.b.store.layers.stack(image.diff_ids))
        layers = self._cm.__enter__()
        if not layers:
            empty = tempfile.mkdtemp(dir=self.b.store.layers.tmp_dir, prefix="build-empty-")
            from unionfs.layers import DirLayer

            self._empty = empty
            layers = [DirLayer(empty)]
        return ViewTree(UnionView(layers), f"image {image.short_id}")

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)
        empty = getattr(self, "_empty", None)
        if empty is not None:
            os.rmdir(empty)


class _SourceTree:
    """The tree a COPY reads: the build context, or ``--from`` a stage or an image."""

    def __init__(self, sb: StageBuilder, src_from: str | None, where: str) -> None:
        self.sb, self.src_from, self.where = sb, src_from, where
        self._viewed: _Viewed | None = None

    def __enter__(self) -> tuple[Any, str]:
        sb = self.sb
        if self.src_from is None:
            return sb.b.context_tree, ""
        name = sb.expand(self.src_from, self.where)
        prior = sb.b.stage_result(name, sb.stage, copy_from=True)
        if prior is not None:
            image, label = prior
        else:
            try:
                image = sb.b.base_image(name, self.where)
            except ImageNotFound:
                raise BuildFileError(f"{self.where}: COPY --from={name}: no such stage or "
                                     "image") from None
            label = name
        if image is None:
            return HostTree(tempfile.gettempdir(), None), label  # pragma: no cover
        self._viewed = _Viewed(sb.b, image)
        return self._viewed.__enter__(), f"{label}@{image.id}"

    def __exit__(self, *exc: object) -> None:
        if self._viewed is not None:
            self._viewed.__exit__(*exc)

