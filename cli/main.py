"""The ``strata`` command: argument parsing and error reporting.  Each command group lives in
its own module and registers its subcommands here; every command is parse arguments, one call
of ``imagestore.Store``, print (docs/architecture.md: where a new command goes).

Caveats:
* Start-up is most of what ``strata umount`` costs: the command groups are imported by name,
  a command loads only its own group (``strata umount`` then loads no image code, nor the
  registry client, nor logging), and the program ends without the interpreter's teardown
  (``os._exit`` once its output is flushed; not under a profiler or tracer).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import gc
import importlib
import io
import os
import signal
import sys
from collections.abc import Iterator, Sequence
from types import FrameType

from imagestore.errors import StoreError

from .common import UserError, size_arg

GROUPS = ("images", "transfer", "registry", "containers", "mount", "commit", "build", "check",
          "run")
GROUP_OF = {  # command -> the group that registers it (tests/unit/test_cli_groups.py)
    "history": "images", "images": "images", "inspect": "images", "rmi": "images",
    "tag": "images", "export": "transfer", "import": "transfer", "load": "transfer",
    "save": "transfer", "login": "registry", "logout": "registry", "pull": "registry",
    "push": "registry", "container": "containers", "create": "containers", "ps": "containers",
    "rm": "containers", "mount": "mount", "mounts": "mount", "umount": "mount",
    "unmount": "mount", "commit": "commit", "diff": "commit", "build": "build",
    "check": "check", "run": "run"}
GC_THRESHOLD = 50_000
SILENT = ("umount", "unmount", "mounts")  # they log nothing: logging is not even imported


def version() -> str:
    from imagestore import __version__

    return __version__


class _Version(argparse.Action):
    """``--version``."""

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


def build_parser(groups: Sequence[str] = GROUPS) -> argparse.ArgumentParser:
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
    for group in groups:
        importlib.import_module(f"{__package__}.{group}").register(sub, image_sub)
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


def command_of(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names (its first word that is no option nor an option's value),
    or None."""
    takes_value = ("--root", "--max-layer-size", "--log-level")
    skip = False
    for word in argv:
        if skip:
            skip = False
        elif word in takes_value:
            skip = True
        elif not word.startswith("-"):
            return word
        elif word == "--":
            return None
    return None


def groups_for(argv: Sequence[str]) -> Sequence[str]:
    """The command groups to load for ``argv``: the command's own, else all (help, ``image
    ...`` and a mistyped command's error need them all)."""
    group = GROUP_OF.get(command_of(argv) or "")
    return (group,) if group else GROUPS


def _preload_mount(argv: Sequence[str]) -> None:
    """``strata mount`` and ``strata run``: fork the daemon of their mount now, before anything
    is parsed or opened, so that it imports what serving takes while this process plans
    (``imagestore.daemonfork``)."""
    if command_of(argv) not in ("mount", "run") or any(
            a in ("-f", "--foreground", "-h", "--help") for a in argv):
        return
    from imagestore import daemonfork
    from imagestore.paths import root_of

    root = None
    for i, word in enumerate(argv):  # the last --root, as argparse takes it
        if word == "--root" and i + 1 < len(argv):
            root = argv[i + 1]
        elif word.startswith("--root="):
            root = word.partition("=")[2]
    daemonfork.preload(root_of(root))


def main(argv: Sequence[str] | None = None) -> int:
    # names from images are bytes (os.fsdecode'd): print them back as the same bytes, as
    # docker does, whatever the locale's codec would make of them
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    argv = sys.argv[1:] if argv is None else list(argv)
    # a command makes objects by the hundred thousand (a TOC, an index) and few cycles: the
    # default threshold (700) collects a hundred times as often, ~10% of a lazy pull
    gc.set_threshold(GC_THRESHOLD, 10, 10)
    _preload_mount(argv)
    parser = build_parser(groups_for(argv))
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command not in SILENT:
        import logging

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
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


def run() -> None:
    """The program: ``main`` and its exit status, ending without the interpreter's teardown
    (with the store's modules loaded it costs every command 20-30 ms; every command closes
    what it wrote before it returns, and only the standard streams and the log are left to
    flush) — unless a profiler or tracer is on, which writes its report at the usual exit."""
    status = main()
    if sys.getprofile() is not None or sys.gettrace() is not None:
        sys.exit(status)
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        status = status or 141
    except OSError:  # a reader gone: as Python's own exit would, say nothing
        pass
    with contextlib.suppress(OSError, ValueError):
        sys.stderr.flush()
    if "logging" in sys.modules:
        sys.modules["logging"].shutdown()
    os._exit(status)


if __name__ == "__main__":
    run()
