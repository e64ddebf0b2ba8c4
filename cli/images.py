"""Image commands: images, tag, rmi, history, inspect, image prune."""

from __future__ import annotations

import argparse
import json
import re
import sys
from typing import Any

from imagestore import Image, InvalidImage, Removed, reference, timefmt

from .common import UserError, confirm, each, store_of
from .output import go_time, human_size, print_formatted, rfc3339, since, table


def register(sub: Any, image_sub: Any) -> None:
    for parent, name, aliases in ((sub, "images", []), (image_sub, "ls", ["list"])):
        p = parent.add_parser(name, aliases=aliases, help="list images")
        p.add_argument("repository", nargs="?", help="only REPOSITORY[:TAG]")
        p.add_argument("-a", "--all", action="store_true", help="show all images")
        p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
        p.add_argument("--no-trunc", action="store_true", help="don't truncate output")
        p.add_argument("--digests", action="store_true", help="show digests")
        p.add_argument("-f", "--filter", action="append", default=[],
                       help="dangling=true|false, label=KEY[=VALUE], reference=PATTERN")
        p.add_argument("--format", help="json, table or a Go-style template")
        p.set_defaults(func=cmd_images)
    for parent, name in ((sub, "tag"), (image_sub, "tag")):
        p = parent.add_parser(name, help="create a tag TARGET that refers to SOURCE")
        p.add_argument("source")
        p.add_argument("target")
        p.set_defaults(func=cmd_tag)
    for parent, name, aliases in ((sub, "rmi", []), (image_sub, "rm", ["remove"])):
        p = parent.add_parser(name, aliases=aliases, help="remove images")
        p.add_argument("images", nargs="+", metavar="IMAGE")
        p.add_argument("-f", "--force", action="store_true", help="force removal")
        p.set_defaults(func=cmd_rmi)
    for parent in (sub, image_sub):
        p = parent.add_parser("history", help="show the history of an image")
        p.add_argument("image")
        p.add_argument("--no-trunc", action="store_true", help="don't truncate output")
        p.add_argument("-q", "--quiet", action="store_true", help="only show image IDs")
        p.add_argument("-H", "--human", type=_bool, default=True, metavar="BOOL",
                       help="human readable sizes and dates (default true)")
        p.add_argument("--format", help="json or a Go-style template")
        p.set_defaults(func=cmd_history)
    for parent in (sub, image_sub):
        p = parent.add_parser("inspect", help="show low-level information on images")
        p.add_argument("names", nargs="+", metavar="NAME")
        p.add_argument("-f", "--format", help="Go-style template")
        p.set_defaults(func=cmd_inspect)
    p = image_sub.add_parser("prune", help="remove unused images")
    p.add_argument("-a", "--all", action="store_true",
                   help="remove all unused images, not just dangling ones")
    p.add_argument("-f", "--force", action="store_true", help="do not prompt for confirmation")
    p.set_defaults(func=cmd_prune)


def _bool(text: str) -> bool:
    value = text.strip().lower()
    if value in ("1", "t", "true", "yes"):
        return True
    if value in ("0", "f", "false", "no"):
        return False
    raise argparse.ArgumentTypeError(f"invalid boolean value {text!r}")


_EPOCH_2000 = 946_684_800


def _short(image_id: str, no_trunc: bool) -> str:
    return image_id if no_trunc else image_id.partition(":")[2][:12]


def _go_path_pattern(pattern: str) -> re.Pattern[str]:
    """Go's ``path.Match`` syntax as a regex: ``*`` and ``?`` never match ``/``, ``[^...]``
    negates a class, ``\\`` escapes."""
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "*":
            out.append("[^/]*")
        elif c == "?":
            out.append("[^/]")
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        elif c == "[":
            end = pattern.find("]", i + 2)
            if end < 0:
                raise UserError(f"invalid reference filter {pattern!r}: syntax error in pattern")
            body = pattern[i + 1:end]
            neg = body.startswith("^")
            body = body[1:] if neg else body
            ranges = "".join(re.escape(x) if x != "-" else "-" for x in body)
            out.append(f"[{'^/' if neg else ''}{ranges}]")
            i = end
        else:
            out.append(re.escape(c))
        i += 1
    return re.compile("".join(out) + r"\Z")


def _matches_filters(image: Image, tag: reference.Reference | None,
                     filters: list[tuple[str, str]]) -> bool:
    patterns = [_go_path_pattern(v) for k, v in filters if k == "reference"]
    # docker's FamiliarMatch: the familiar NAME:TAG, then the familiar name; several
    # reference filters match when any of them does
    if patterns and (tag is None or not any(p.match(n) for p in patterns
                                            for n in (tag.familiar, tag.familiar_name))):
        return False
    for key, value in filters:
        if key == "dangling":
            if (value == "true") != (not image.tags):
                return False
        elif key == "label":
            k, eq, v = value.partition("=")
            labels = image.config.labels
            if k not in labels or (eq and labels[k] != v):
                return False
    return True


def _parse_filters(raw: list[str]) -> list[tuple[str, str]]:
    out = []
    for f in raw:
        key, eq, value = f.partition("=")
        if not eq or key not in ("dangling", "label", "reference"):
            raise UserError(f"invalid filter {f!r} (use dangling=, label= or reference=)")
        if key == "dangling" and value not in ("true", "false"):
            raise UserError(f"invalid filter 'dangling={value}': use true or false")
        out.append((key, value))
    return out


def _image_rows(args: argparse.Namespace, damaged: list[InvalidImage]
                ) -> list[dict[str, Any]]:
    store = store_of(args)
    filters = _parse_filters(args.filter)
    if args.repository:  # docker adds REPOSITORY[:TAG] to the reference filters
        filters.append(("reference", args.repository))
    rows = []
    every = store.images(damaged=damaged.append)
    parents = {i.parent for i in every if i.parent}
    for image in sorted(every, key=lambda i: timefmt.parse(i.created) or 0, reverse=True):
        if not args.all and not image.tags and image.id in parents:
            continue  # a build's intermediate image, as docker hides them without -a
        for tag in image.tags or (None,):
            if not _matches_filters(image, tag, filters):
                continue
            digest = "<none>"
            for rd in image.repo_digests:
                ref = reference.parse(rd)
                if tag is not None and ref.name == tag.name and ref.digest:
                    digest = ref.digest
            rows.append({
                "Repository": tag.familiar_name if tag else "<none>",
                "Tag": tag.tag if tag and tag.tag else "<none>",
                "Digest": digest,
                "ID": _short(image.id, args.no_trunc),
                "CreatedAt": go_time(image.created),
                "CreatedSince": since(image.created),
                "Size": human_size(image.size),
                "VirtualSize": human_size(image.size),
                "SharedSize": "N/A",
                "UniqueSize": "N/A",
                "Containers": "N/A",
                # strata's own: "partial" while layers pulled with --lazy are still arriving
                "Local": "partial" if store.lazy_layers(image) else "complete",
            })
    return rows


def cmd_images(args: argparse.Namespace) -> int:
    """The images that can be read; each damaged one is an error line after the list (and
    the exit status is 1), so one bad record does not hide the rest."""
    damaged: list[InvalidImage] = []
    _print_images(args, _image_rows(args, damaged))
    sys.stdout.flush()
    for exc in damaged:
        print(f"Error: {exc}", file=sys.stderr)
    return 1 if damaged else 0


def _print_images(args: argparse.Namespace, rows: list[dict[str, Any]]) -> None:
    if args.quiet:
        for image_id in dict.fromkeys(r["ID"] for r in rows):
            print(image_id)
    elif args.format:
        print_formatted(args.format, rows, {"Repository": "REPOSITORY", "Tag": "TAG",
                                            "ID": "IMAGE ID", "CreatedSince": "CREATED",
                                            "Size": "SIZE", "Digest": "DIGEST"})
    else:
        cols = ["Repository", "Tag"] + (["Digest"] if args.digests else []) + [
            "ID", "CreatedSince", "Size"]
        head = {"Repository": "REPOSITORY", "Tag": "TAG", "Digest": "DIGEST",
                "ID": "IMAGE ID", "CreatedSince": "CREATED", "Size": "SIZE"}
        table([[head[c] for c in cols]] + [[r[c] for c in cols] for r in rows])
        partial = list(dict.fromkeys(r["ID"] for r in rows if r["Local"] == "partial"))
        if partial:  # docker has no such column: a note keeps the table docker's
            sys.stdout.flush()
            print(f"note: not fully local (pulled with --lazy; `strata pull` completes them): "
                  f"{', '.join(partial)}", file=sys.stderr)


def cmd_tag(args: argparse.Namespace) -> int:
    store_of(args).tag(args.source, args.target)
    return 0


def _print_removed(r: Removed, lower: bool = False) -> None:
    for u in r.untagged:
        print(f"{'untagged' if lower else 'Untagged'}: {u}")
    for d in r.deleted:
        print(f"{'deleted' if lower else 'Deleted'}: {d}")


def cmd_rmi(args: argparse.Namespace) -> int:
    store = store_of(args)
    return each(args.images, lambda name: _print_removed(store.remove(name, force=args.force)))


def cmd_history(args: argparse.Namespace) -> int:
    rows = store_of(args).history(args.image)
    out = []
    for r in rows:
        created_by = r["created_by"].replace("\t", " ")
        if not args.no_trunc and len(created_by) > 45:
            created_by = created_by[:44] + "…"
        created = r["created"]
        ts = timefmt.parse(created)
        out.append({
            "ID": _short(r["id"], args.no_trunc) if r["id"] else "<missing>",
            # docker shows no age for dates before 2000 (unset ones)
            "CreatedSince": (since(created) if ts is not None and ts > _EPOCH_2000 else "")
            if args.human else rfc3339(created),
            "CreatedAt": rfc3339(created),
            "CreatedBy": created_by,
            "Size": human_size(r["size"]) if args.human else str(r["size"]),
            "Comment": r["comment"],
        })
    if args.quiet:  # docker prints {{.ID}} for every row, <missing> ones included
        for r in out:
            print(r["ID"])
        return 0
    if args.format:
        print_formatted(args.format, out, {"ID": "IMAGE", "CreatedSince": "CREATED",
                                           "CreatedAt": "CREATED AT",
                                           "CreatedBy": "CREATED BY", "Size": "SIZE",
                                           "Comment": "COMMENT"})
        return 0
    created_col = ("CREATED", "CreatedSince") if args.human else ("CREATED AT", "CreatedAt")
    table([["IMAGE", created_col[0], "CREATED BY", "SIZE", "COMMENT"]] + [
        [r["ID"], r[created_col[1]], r["CreatedBy"], r["Size"], r["Comment"]] for r in out])
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    store = store_of(args)
    found: list[dict[str, Any]] = []
    status = each(args.names, lambda name: found.append(store.inspect(name)))
    if args.format:
        print_formatted(args.format, found)
    else:
        print(json.dumps(found, indent=4))
    return status


def cmd_prune(args: argparse.Namespace) -> int:
    what = ("all images without at least one container associated to them" if args.all
            else "all dangling images")
    if not args.force and not confirm(f"WARNING! This will remove {what}.\n"
                                      "Are you sure you want to continue?"):
        return 0
    r = store_of(args).prune(all_images=args.all)
    if r.untagged or r.deleted:
        print("Deleted Images:")
        _print_removed(r, lower=True)
        print()
    print(f"Total reclaimed space: {human_size(r.reclaimed)}")
    return 0
