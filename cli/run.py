"""``strata run``: docker's flags parsed into one ``Store.run`` call.

The exit status is the command's; 125 is strata's own error (and the runtime's), 126 a command
that cannot be executed, 127 one that is not found, 128+N a command killed by signal N.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import UserError, store_of


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser(
        "run", add_help=False, help="run a command in a new or existing container",
        description="strata run [OPTIONS] IMAGE|CONTAINER [COMMAND [ARG...]]: a command in "
                    "a container on its union mount, through an OCI runtime (crun).")
    p.add_argument("--help", action="help", help="show this help message and exit")
    p.add_argument("target", metavar="IMAGE|CONTAINER")
    p.add_argument("command", nargs=argparse.REMAINDER, metavar="COMMAND [ARG...]")
    p.add_argument("--name", help="name of the new container")
    p.add_argument("--rm", action="store_true", help="remove the container when it exits")
    p.add_argument("-i", "--interactive", action="store_true", help="pass stdin")
    p.add_argument("-t", "--tty", action="store_true", help="allocate a terminal")
    p.add_argument("-e", "--env", action="append", default=[], metavar="K[=V]",
                   help="set an environment variable (K alone: this one's value)")
    p.add_argument("--env-file", action="append", default=[], metavar="FILE",
                   help="read K=V lines from FILE")
    p.add_argument("-w", "--workdir", help="working directory (created if missing)")
    p.add_argument("-u", "--user", help="name|uid[:group|gid]")
    p.add_argument("--group-add", action="append", default=[], metavar="GROUP",
                   help="an additional group")
    p.add_argument("--entrypoint", help="replace the image's entrypoint (\"\" clears it)")
    p.add_argument("-h", "--hostname", help="the container's host name")
    p.add_argument("--network", "--net", default="none", choices=["none", "host"],
                   help="none (a private network with only lo; the default) or host")
    p.add_argument("-v", "--volume", action="append", default=[], metavar="HOST:CTR[:ro]",
                   help="bind-mount a host path")
    p.add_argument("--tmpfs", action="append", default=[], metavar="DIR[:OPTS]",
                   help="mount a tmpfs")
    p.add_argument("--privileged", action="store_true",
                   help="every capability and device, no masked paths")
    p.add_argument("--cap-add", action="append", default=[], metavar="CAP")
    p.add_argument("--cap-drop", action="append", default=[], metavar="CAP")
    p.add_argument("--read-only", action="store_true", help="mount the rootfs read-only")
    p.add_argument("--security-opt", action="append", default=[], metavar="OPT",
                   help="no-new-privileges, seccomp=unconfined|PATH")
    p.add_argument("--cgroups", default="enabled", choices=["enabled", "disabled"],
                   help="disabled: no cgroup of its own (crun only)")
    p.add_argument("--runtime", help="the OCI runtime (a path or a name; default crun, "
                                     "else runc)")
    p.set_defaults(func=cmd_run)


def cmd_run(args: argparse.Namespace) -> int:
    from imagestore import RunError, StoreError

    if os.geteuid() != 0:  # before the store is opened (that would make it)
        from imagestore.run import NOT_ROOT

        raise UserError(NOT_ROOT, 125)
    sys.stdout.flush()
    try:
        return store_of(args).run(
            args.target, args.command, interactive=args.interactive, tty=args.tty,
            name=args.name, remove=args.rm, runtime=args.runtime,
            entrypoint=None if args.entrypoint is None else
            ([args.entrypoint] if args.entrypoint else []),
            env=args.env, env_file=args.env_file, workdir=args.workdir, user=args.user,
            group_add=args.group_add, hostname=args.hostname, network=args.network,
            volumes=args.volume, tmpfs=args.tmpfs, cap_add=args.cap_add,
            cap_drop=args.cap_drop, privileged=args.privileged, read_only=args.read_only,
            security_opt=args.security_opt, cgroups=args.cgroups == "enabled")
    except RunError as exc:
        raise UserError(str(exc), exc.exit_status) from None
    except StoreError as exc:
        raise UserError(str(exc), 125) from None
