"""``strata check [--repair]``: verify the store (``Store.check``) and print one line per
problem; the exit status is 1 while any problem is left."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .common import store_of


def register(sub: Any, image_sub: Any) -> None:
    p = sub.add_parser("check", help="verify the store: blobs, layers, images, containers, "
                                     "mounts and leftovers",
                       description="Verify every blob's digest, every layer's diff_id and "
                                   "index, every image and tag, every container's writable "
                                   "layer, mount records and tmp/.  One line per problem; "
                                   "exit status 1 if any is left.")
    p.add_argument("--repair", action="store_true",
                   help="remove leftovers and broken content that no image needs, rebuild "
                        "indexes of sound layers, drop tags naming no image")
    p.set_defaults(func=cmd_check)


def cmd_check(args: argparse.Namespace) -> int:
    report = store_of(args).check(repair=args.repair)
    fixed = {id(p) for p in report.repaired}
    failed = {id(p): why for p, why in report.failed}
    for p in report.problems:
        if id(p) in fixed:
            print(f"repaired: {p}")
        elif id(p) in failed:
            print(f"{p} (repair failed: {failed[id(p)]})")
        elif args.repair and p.repair is None:
            print(f"{p} (cannot be repaired here)")
        else:
            print(p)
    left = len(report.problems) - len(report.repaired)
    counts = ", ".join(f"{n} {what}" for what, n in report.counts.items())
    print(f"checked {counts}: " + (f"{left} problem(s)" if left else "no problems")
          + (f", {len(report.repaired)} repaired" if report.repaired else ""), file=sys.stderr)
    return 1 if left else 0
