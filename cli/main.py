"""The ``strata`` command: argument parsing and error reporting.  Each command group lives in
its own module and registers its subcommands here; every command is parse arguments, one call
of ``imagestore.Store``, print (docs/architecture.md: where a new command goes)."""

from __future__ import annotations

import argparse
import contextlib
import errno
import io
import logging
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType
from typing import NoReturn

from imagestore.errors import StoreError

from . import build, check, commit, containers, images, mount, registry, run, transfer
from .common import UserError, size_arg

GROUPS = (images, transfer, registry, containers, mount, commit, build, check, run)


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("strata")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown (not installed)"


class _Version(argparse.Action):
    """``--version``: the installed version is looked up only when asked (importlib.metadata
    costs every command 20-30 ms otherwise)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: object, option_string: str | None = None) -> None:
        print(f"strata {version()}")
        parser.exit()


def _globals(parser: argparse.ArgumentParser, default: object) -> None:
    """The options every command takes, before or after its name (after it, they override
    the ones before: ``default`` is ``SUPPRESS`` there)."""
    parser.add_argument("--root", default=default,
                        help="store directory (default: $STRATA_ROOT, /var/lib/strata for root, "
                             "else $XDG_DATA_HOME/strata)")
    parser.add_argument("--max-layer-size", type=size_arg, default=default, metavar="SIZE",
                        help="the most a layer (or a compressed archive) may decompress to, "
                             "e.g. 512M, 10G (default: $STRATA_MAX_LAYER_SIZE, else 64G)")
    parser.add_argument("--log-level", default=default,
                        choices=["debug", "info", "warning", "error"], help="logging level")


def subparsers(parser: argparse.ArgumentParser) -> Iterator[tuple[str, argparse.ArgumentParser]]:
    """Every subcommand's parser, nested ones included, with its full name."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            for name, sub in action.choices.items():
                text = helps.get(name, "")
                if sub.description is None and text:
                    sub.description = f"{text[0].upper()}{text[1:]}."
                yield name, sub
                for inner, p in subparsers(sub):
                    yield f"{name} {inner}", p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Turn container images into mountable root filesystems.",
        epilog="Run 'strata COMMAND --help' for more information on a command.",
    )
    parser.add_argument("--version", action=_Version, nargs=0,
                        help="show program's version number and exit")
    _globals(parser, None)
    parser.set_defaults(log_level="warning")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    image_group = sub.add_parser("image", help="manage images")
    image_sub = image_group.add_subparsers(dest="image_command", metavar="COMMAND")
    image_sub.required = True
    for group in GROUPS:
        group.register(sub, image_sub)
    seen: set[int] = set()
    for _, p in subparsers(parser):
        if id(p) not in seen and not p._subparsers:
            seen.add(id(p))
            _globals(p, argparse.SUPPRESS)
    return parser


_received: list[int] = []


def _interrupted(signum: int, frame: FrameType | None) -> None:
    """SIGTERM and SIGHUP (``timeout``, a CI runner, a closed terminal) end a command as
    Ctrl-C does, through whatever handles SIGINT at that moment (trio's, which raises
    KeyboardInterrupt only where it is safe; a mount teardown's, which holds it), so every
    cleanup on the way out runs; the exit status is 128 + the signal's number."""
    _received.append(signum)
    handler = signal.getsignal(signal.SIGINT)
    if callable(handler):
        handler(signal.SIGINT, frame)
    else:
        signal.default_int_handler(signal.SIGINT, frame)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command ``argv`` (default: this program's arguments) and return its exit
    status.  Called as the program (no ``argv``: the ``strata`` script, ``python -m
    cli.main``), it ends the process itself once the command is done (``_exit``)."""
    status = _main(argv)
    if argv is None and sys.getprofile() is None and sys.gettrace() is None:
        _exit(status)  # (a profiler or coverage writes its report at the usual exit)
    return status


def _exit(status: int) -> NoReturn:
    """End the process without the interpreter's teardown, which, with the store's modules
    loaded, costs every command 20-30 ms: every command closes what it wrote before it
    returns, and only the standard streams and the log are left to flush."""
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = status or 141
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    logging.shutdown()
    os._exit(status)


def _main(argv: Sequence[str] | None) -> int:
    # names from images are bytes (os.fsdecode'd): print them back as the same bytes, as
    # docker does, whatever the locale's codec would make of them
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupted)
    try:
        result = args.func(args)
        return int(result or 0)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except StoreError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        got = _received[0] if _received else int(signal.SIGINT)
        print("interrupted" + (f" ({signal.Signals(got).name})" if _received else ""),
              file=sys.stderr)
        return 128 + got
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"Error: {exc.strerror}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
