"""``cli.main.GROUP_OF`` names, for every command, the group that registers it: a command
loads only its own group, so a wrong or missing entry would hide the command or its help."""

from __future__ import annotations

import argparse
import importlib

from cli import main


def test_every_command_is_listed_with_its_group() -> None:
    registered = {}
    for group in main.GROUPS:
        parser = argparse.ArgumentParser()
        sub = parser.add_subparsers()
        image_sub = sub.add_parser("image").add_subparsers()
        importlib.import_module(f"cli.{group}").register(sub, image_sub)
        registered.update({name: group for name in sub.choices if name != "image"})
    assert registered == main.GROUP_OF


def test_a_command_loads_its_group_and_the_rest_load_all() -> None:
    assert main.groups_for(["--root", "/x", "pull", "busybox"]) == ("registry",)
    assert main.groups_for(["image", "ls"]) == main.GROUPS
    assert main.groups_for(["pul"]) == main.GROUPS
    assert main.groups_for([]) == main.GROUPS
