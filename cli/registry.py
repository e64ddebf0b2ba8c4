"""Registry commands: pull, push, login, logout.

The registry client (httpx, trio, ssl) is imported when one of these commands runs, not when
``strata`` starts: every other command would pay for it.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from typing import Any

from .common import UserError, store_of


def register(sub: Any, image_sub: Any) -> None:
    for parent in (sub, image_sub):
        p = parent.add_parser(
            "pull", help="download an image from a registry",
            description="Download an image from a registry (distribution API v2), verifying "
                        "every digest, and record it with its RepoDigest.  Layers already "
                        "stored are skipped; an interrupted download resumes.  A mirror or an "
                        "insecure registry is set in registries.json (see the README).")
        p.add_argument("name", metavar="NAME[:TAG|@DIGEST]")
        p.add_argument("--platform", help="OS/ARCH[/VARIANT] to pull from a multi-platform "
                                          "image (default: the host's)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only the image reference")
        p.add_argument("--lazy", action="store_true",
                       help="fetch only the table of contents of layers in a seekable format "
                            "(eStargz, zstd:chunked); their files are fetched when read")
        p.set_defaults(func=cmd_pull)
    for parent in (sub, image_sub):
        p = parent.add_parser(
            "push", help="upload an image to a registry",
            description="Upload an image to a registry with its blobs exactly as stored, so a "
                        "pulled image keeps its digests; blobs the registry has are skipped, "
                        "blobs in another repository of it are mounted.")
        p.add_argument("name", metavar="NAME[:TAG]", help="the image to push")
        p.add_argument("dest", nargs="?", metavar="DEST",
                       help="where to push it (default: NAME)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only the pushed reference")
        p.add_argument("--compression", choices=("gzip", "zstd", "estargz", "zstd:chunked"),
                       help="recompress the layers in another form on the way (estargz and "
                            "zstd:chunked can be pulled lazily); the pushed manifest is OCI")
        p.set_defaults(func=cmd_push)
    p = sub.add_parser("login", help="log in to a registry",
                       description="Check credentials against a registry and store them as "
                                   "docker does (config.json or a credential helper).")
    p.add_argument("server", nargs="?", default="docker.io", metavar="SERVER")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="the password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("logout", help="log out from a registry")
    p.add_argument("server", nargs="?", default="docker.io", metavar="SERVER")
    p.set_defaults(func=cmd_logout)


def cmd_pull(args: argparse.Namespace) -> int:
    from .progress import ProgressPrinter

    printer = None if args.quiet else ProgressPrinter()
    result = store_of(args).pull(args.name, platform=args.platform, progress=printer,
                                lazy=args.lazy)
    if not args.quiet:
        print(f"Digest: {result.digest}")
        status = "Image is up to date" if result.up_to_date else "Downloaded newer image"
        print(f"Status: {status} for {result.ref.familiar}")
    print(result.ref)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    from .progress import ProgressPrinter

    printer = None if args.quiet else ProgressPrinter()
    result = store_of(args).push(args.name, args.dest, progress=printer,
                                 compression=args.compression)
    if args.quiet:
        print(result.ref)
    else:
        label = f"{result.ref.tag}: " if result.ref.tag else ""
        print(f"{label}digest: {result.digest} size: {result.size}")
    return 0


def _prompt(text: str, secret: bool = False) -> str:
    if not sys.stdin.isatty():
        raise UserError("Cannot perform an interactive login from a non TTY device")
    return getpass.getpass(text) if secret else input(text)


def cmd_login(args: argparse.Namespace) -> int:
    from imagestore import registry

    if args.password_stdin:
        if args.password:
            raise UserError("--password and --password-stdin are mutually exclusive")
        if not args.username:
            raise UserError("Must provide --username with --password-stdin")
        password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    elif args.password is not None:
        print("WARNING! Using --password via the CLI is insecure. Use --password-stdin.",
              file=sys.stderr)
        password = args.password
    else:
        password = ""
    username = args.username or _prompt("Username: ")
    if not password:
        password = _prompt("Password: ", secret=True)
    if not username or not password:
        raise UserError("username and password are required")
    registry.login(args.server, username, password)
    print("Login Succeeded")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from imagestore import registry

    key, removed = registry.logout(args.server)
    print(f"Removing login credentials for {key}" if removed else f"Not logged in to {key}")
    return 0
