"""The ``strata`` command: argument parsing and error reporting; each command group lives in
its own module and registers its subcommands here.

Caveats:
* Start-up time: the command groups are imported by name, and the mount commands
  (``LIGHT``) import only their own group, so ``strata umount`` loads neither the store's
  image code nor the registry client, nor logging (``SILENT``): about 50 ms instead of 110.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import io
import os
import sys
from collections.abc import Sequence

from .common import UserError, size_arg

GROUPS = ("images", "transfer", "registry", "containers", "mount", "commit", "check")
LIGHT = {"mount": "mount", "umount": "mount", "unmount": "mount", "mounts": "mount"}
SILENT = ("umount", "unmount")  # they log nothing: logging is not even imported for them
# printed as one line; looked up among the modules already imported (an error class whose
# module was never imported cannot have been raised)
ONE_LINE = (("imagestore.errors", "StoreError"), ("unionfs.tarheaders", "LayerError"),
            ("unionfs.errors", "MountError"))


def _globals(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--root", default=None,
                        help="store directory (default: $STRATA_ROOT, /var/lib/strata for root, "
                             "else $XDG_DATA_HOME/strata)")
    parser.add_argument("--max-layer-size", type=size_arg, default=None, metavar="SIZE",
                        help="the most a layer (or a compressed archive) may decompress to, "
                             "e.g. 512M, 10G (default: $STRATA_MAX_LAYER_SIZE, else 64G)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"], help="logging level")


def build_parser(groups: Sequence[str] = GROUPS) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Turn container images into mountable root filesystems.",
    )
    _globals(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    image_group = sub.add_parser("image", help="manage images")
    image_sub = image_group.add_subparsers(dest="image_command", metavar="COMMAND")
    image_sub.required = True
    for group in groups:
        importlib.import_module(f"{__package__}.{group}").register(sub, image_sub)
    return parser


def _groups_for(argv: Sequence[str]) -> Sequence[str]:
    """The command groups to load for ``argv``: the one group of a ``LIGHT`` command, else
    all (help, an unknown command and its error message need them all)."""
    pre = argparse.ArgumentParser(add_help=False)
    _globals(pre)
    pre.add_argument("command", nargs="?")
    try:
        known, _ = pre.parse_known_args(argv)
    except SystemExit:  # a bad global option: the full parser says what is wrong
        return GROUPS
    group = LIGHT.get(known.command or "")
    return (group,) if group else GROUPS


def _one_line(exc: Exception) -> bool:
    for module, name in ONE_LINE:
        loaded = sys.modules.get(module)
        if loaded is not None and isinstance(exc, getattr(loaded, name)):
            return True
    return False


def main(argv: Sequence[str] | None = None) -> int:
    # names from images are bytes (os.fsdecode'd): print them back as the same bytes, as
    # docker does, whatever the locale's codec would make of them
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(_groups_for(argv))
    args = parser.parse_args(argv)
    if args.command not in SILENT:
        import logging

        logging.basicConfig(level=args.log_level.upper(),
                            format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
        return int(result or 0)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        if _one_line(exc):
            print(f"Error: {exc}", file=sys.stderr)
            return 1
        if isinstance(exc, BrokenPipeError):
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            return 141
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            print(f"Error: {exc.strerror}", file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":
    sys.exit(main())
