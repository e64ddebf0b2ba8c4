"""The ``strata`` command: argument parsing and error reporting; each command group lives in
its own module and registers its subcommands here."""

from __future__ import annotations

import argparse
import errno
import io
import logging
import os
import sys
from collections.abc import Sequence

from imagestore.errors import StoreError
from unionfs.errors import MountError
from unionfs.tarlayer import LayerError

from . import check, commit, containers, images, mount, registry, run, transfer
from .common import UserError, size_arg

GROUPS = (images, transfer, registry, containers, mount, commit, check, run)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="strata",
        description="Turn container images into mountable root filesystems.",
    )
    parser.add_argument("--root", default=None,
                        help="store directory (default: $STRATA_ROOT, /var/lib/strata for root, "
                             "else $XDG_DATA_HOME/strata)")
    parser.add_argument("--max-layer-size", type=size_arg, default=None, metavar="SIZE",
                        help="the most a layer (or a compressed archive) may decompress to, "
                             "e.g. 512M, 10G (default: $STRATA_MAX_LAYER_SIZE, else 64G)")
    parser.add_argument("--log-level", default="warning",
                        choices=["debug", "info", "warning", "error"], help="logging level")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    image_group = sub.add_parser("image", help="manage images")
    image_sub = image_group.add_subparsers(dest="image_command", metavar="COMMAND")
    image_sub.required = True
    for group in GROUPS:
        group.register(sub, image_sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    # names from images are bytes (os.fsdecode'd): print them back as the same bytes, as
    # docker does, whatever the locale's codec would make of them
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(errors="surrogateescape")
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        result = args.func(args)
        return int(result or 0)
    except UserError as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (StoreError, LayerError, MountError) as exc:
        print(f"Error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
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
