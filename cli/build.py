"""``strata build``: an image from a Dockerfile (``Store.build``), with BuildKit's plain
progress on stderr (``#N [2/5] COPY . /app``, ``#N CACHED``, ``#N DONE 0.3s``, RUN output as
``#N 0.215 text``)."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, TextIO

from .common import UserError, store_of


def register(sub: Any, image_sub: Any) -> None:
    for parent, name in ((sub, "build"), (image_sub, "build")):
        p = parent.add_parser(name, help="build an image from a Dockerfile")
        p.add_argument("context", metavar="CONTEXT", help="the build context (a directory)")
        p.add_argument("-t", "--tag", action="append", default=[], metavar="NAME[:TAG]",
                       help="name the image (repeatable)")
        p.add_argument("-f", "--file", metavar="FILE",
                       help="the Dockerfile (default CONTEXT/Dockerfile; - reads stdin)")
        p.add_argument("--build-arg", action="append", default=[], metavar="KEY[=VALUE]",
                       help="set a build argument (KEY alone: from the environment)")
        p.add_argument("--target", metavar="STAGE", help="the stage to build")
        p.add_argument("--no-cache", action="store_true", help="do not use the build cache")
        p.add_argument("--pull", action="store_true", help="always pull the base images")
        p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                       help="set a label on the image (repeatable)")
        p.add_argument("--network", choices=["host", "none", "default"], default="host",
                       help="RUN's network (default host)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only the image ID")
        p.add_argument("--iidfile", metavar="FILE", help="write the image ID to FILE")
        p.set_defaults(func=cmd_build)


def _pairs(items: list[str], what: str, from_env: bool) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not key:
            raise UserError(f"invalid {what} {item!r}: KEY=VALUE")
        if not eq:
            if not from_env:
                raise UserError(f"invalid {what} {item!r}: KEY=VALUE")
            if key not in os.environ:
                continue  # docker: a KEY alone that the environment lacks sets nothing
            value = os.environ[key]
        out[key] = value
    return out


class PlainProgress:
    """BuildKit's ``--progress=plain`` lines, from ``BuildEvent`` values."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def __call__(self, ev: Any) -> None:
        kind, n = ev.kind, ev.step
        if kind == "step":
            line = f"#{n} {ev.text}"
        elif kind == "cached":
            line = f"#{n} CACHED"
        elif kind == "done":
            line = f"#{n} DONE {ev.seconds:.1f}s"
        elif kind == "output":
            line = f"#{n} {ev.seconds:.3f} {ev.text}"
        elif kind == "error":
            line = f"#{n} ERROR: {ev.text}"
        elif kind == "warning":
            line = f"[Warning] {ev.text}"
        elif kind == "image":
            line = f"writing image {ev.text} done"
        elif kind == "tag":
            line = f"naming to {ev.text} done"
        else:
            return
        print(line, file=self.out, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    from imagestore import BuildStepFailed

    text = None
    dockerfile = args.file
    if args.file == "-":
        text = sys.stdin.read()
        dockerfile = None
    try:
        image = _build(args, dockerfile, text)
    except BuildStepFailed as exc:
        if args.quiet and exc.output:  # the progress that would have shown it was off
            print(exc.output, file=sys.stderr)
        raise
    if args.iidfile:
        try:
            with open(args.iidfile, "w") as f:
                f.write(image.id)
        except OSError as exc:
            raise UserError(f"cannot write the image ID to {args.iidfile}: "
                            f"{exc.strerror}") from None
    if args.quiet:
        print(image.id)
    return 0


def _build(args: argparse.Namespace, dockerfile: str | None, text: str | None) -> Any:
    return store_of(args).build(
        args.context, dockerfile, dockerfile_text=text, tags=args.tag,
        build_args=_pairs(args.build_arg, "--build-arg", True),
        target=args.target, no_cache=args.no_cache, pull=args.pull,
        labels=_pairs(args.label, "--label", False), network=args.network,
        progress=None if args.quiet else PlainProgress(sys.stderr))
