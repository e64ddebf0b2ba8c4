"""Registry commands: pull, push, login, logout.

The registry client (httpx, trio, ssl) is imported when one of these commands runs, not when
``strata`` starts: every other command would pay for it.
"""

from __future__ import annotations

import argparse
import functools
import getpass
import sys
from typing import Any

from imagestore import oci, reference
from imagestore.errors import InvalidReference

from .common import UserError, store_of


def register(sub: Any, image_sub: Any) -> None:
    for parent in (sub, image_sub):
        p = parent.add_parser("pull", help="download an image from a registry")
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
        p = parent.add_parser("push", help="upload an image to a registry")
        p.add_argument("name", metavar="NAME[:TAG]", help="the image to push")
        p.add_argument("dest", nargs="?", metavar="DEST",
                       help="where to push it (default: NAME)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="print only the pushed reference")
        p.set_defaults(func=cmd_push)
    p = sub.add_parser("login", help="log in to a registry")
    p.add_argument("server", nargs="?", default="docker.io", metavar="SERVER")
    p.add_argument("-u", "--username")
    p.add_argument("-p", "--password", help="the password (prefer --password-stdin)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.set_defaults(func=cmd_login)
    p = sub.add_parser("logout", help="log out from a registry")
    p.add_argument("server", nargs="?", default="docker.io", metavar="SERVER")
    p.set_defaults(func=cmd_logout)


def _parse(name: str) -> reference.Reference:
    try:
        return reference.parse(name)
    except InvalidReference as exc:
        raise UserError(str(exc)) from None


def cmd_pull(args: argparse.Namespace) -> int:
    import trio

    from imagestore import registry

    from .progress import ProgressPrinter

    store = store_of(args)
    ref = _parse(args.name)
    platform = None
    if args.platform:
        try:
            platform = oci.Platform.parse(args.platform)
        except InvalidReference as exc:
            raise UserError(str(exc)) from None
    if not args.quiet and reference.parse(args.name, default_tag=False).tag is None \
            and ref.digest is None:
        print(f"Using default tag: {ref.tag}")
    printer = None if args.quiet else ProgressPrinter()
    result = trio.run(functools.partial(registry.pull, store, ref, platform=platform,
                                        events=printer, lazy=args.lazy))
    if not args.quiet:
        print(f"Digest: {result.digest}")
        status = "Image is up to date" if result.up_to_date else "Downloaded newer image"
        print(f"Status: {status} for {ref.familiar}")
    print(ref)
    return 0


def cmd_push(args: argparse.Namespace) -> int:
    import trio

    from imagestore import registry

    from .progress import ProgressPrinter

    store = store_of(args)
    image = store.resolve(args.name)
    if args.dest is None:
        ref = _parse(args.name)
        if ref not in image.tags and ref.digest is None:
            raise UserError(f"An image does not exist locally with the tag: {ref.familiar}")
        dest = ref
    else:
        dest = _parse(args.dest)
    if not args.quiet:
        print(f"The push refers to repository [{dest.name}]")
    printer = None if args.quiet else ProgressPrinter()
    result = trio.run(functools.partial(registry.push, store, image, dest, events=printer))
    if args.quiet:
        print(dest)
    else:
        label = f"{dest.tag}: " if dest.tag else ""
        print(f"{label}digest: {result.digest} size: {result.size}")
    return 0


def _prompt(text: str, secret: bool = False) -> str:
    if not sys.stdin.isatty():
        raise UserError("Cannot perform an interactive login from a non TTY device")
    return getpass.getpass(text) if secret else input(text)


def cmd_login(args: argparse.Namespace) -> int:
    import trio

    from imagestore import registry
    from imagestore.registry import credentials

    host = credentials.normalize_host(args.server)
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
    creds = credentials.Credentials(username, password)
    trio.run(registry.check_login, host, creds)
    credentials.store_login(host, creds)
    print("Login Succeeded")
    return 0


def cmd_logout(args: argparse.Namespace) -> int:
    from imagestore.registry import credentials

    host = credentials.normalize_host(args.server)
    if credentials.erase_login(host):
        print(f"Removing login credentials for {credentials.server_key(host)}")
    else:
        print(f"Not logged in to {credentials.server_key(host)}")
    return 0
