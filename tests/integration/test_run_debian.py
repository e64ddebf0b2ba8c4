"""``strata run`` on a real distribution: Debian bookworm (minbase, built from Debian's mirror
once per session, tests/debian.py) runs ``dpkg -l`` and ``useradd``, and the committed image
holds exactly what ``useradd`` wrote — none of the runtime's mount targets."""

from __future__ import annotations

import json
import tarfile

import pytest

from tests.conftest import Strata

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.runtime, pytest.mark.slow]


def test_dpkg_lists_the_installed_packages(debian_strata: tuple[Strata, str]) -> None:
    strata, image = debian_strata
    proc = strata("run", "--rm", image, "dpkg-query", "-W", "-f",
                  "${db:Status-Abbrev} ${Package}\n")
    installed = {line.split()[1] for line in proc.stdout.decode().splitlines()
                 if line.startswith("ii ")}
    assert {"dpkg", "passwd", "bash", "coreutils", "libc6", "apt"} <= installed
    listing = strata("run", "--rm", image, "dpkg", "-l").stdout.decode()
    assert "Desired=Unknown/Install/Remove/Purge/Hold" in listing
    assert any(line.split()[:2] == ["ii", "passwd"] for line in listing.splitlines())


def test_useradd_and_the_committed_change_is_what_it_wrote(
        debian_strata: tuple[Strata, str]) -> None:
    strata, image = debian_strata
    proc = strata("run", "--name", "adduser", image, "sh", "-c",
                  "useradd --create-home --uid 1234 --shell /bin/bash bob && id bob "
                  "&& grep '^bob:' /etc/passwd")
    assert proc.stdout.decode() == ("uid=1234(bob) gid=1234(bob) groups=1234(bob)\n"
                                    "bob:x:1234:1234::/home/bob:/bin/bash\n")
    diff = [line.split(" ", 1) for line in strata.out("diff", "adduser").splitlines()]
    paths = {p for _, p in diff}
    assert {"/etc/passwd", "/etc/shadow", "/etc/group", "/etc/gshadow", "/home/bob",
            "/home/bob/.bashrc"} <= paths
    assert all(p == "/etc" or p.startswith(("/etc/", "/home", "/var/log")) for p in paths), paths
    for target in ("/etc/hosts", "/etc/hostname", "/etc/resolv.conf", "/proc", "/sys", "/dev"):
        assert target not in paths
    committed = strata.out("commit", "adduser", "debian:with-bob").strip()
    # the new layer holds exactly the changes diff listed
    info = json.loads(strata.out("inspect", committed))[0]
    diff_id = info["RootFS"]["Layers"][-1]
    layer = strata.root / "layers" / "sha256" / diff_id.split(":")[1] / "layer.tar"
    with tarfile.open(layer) as tar:
        names = {m.name.removeprefix("./").rstrip("/") for m in tar.getmembers()}
        passwd = tar.extractfile("etc/passwd")
        assert passwd is not None and b"bob:x:1234:1234::/home/bob:/bin/bash\n" in passwd.read()
    expected = {p.lstrip("/") for kind, p in diff if kind != "D"}
    expected |= {p.lstrip("/").rpartition("/")[0] + "/.wh." + p.rpartition("/")[2]
                 for kind, p in diff if kind == "D"}
    # kernel overlayfs marks a directory it makes in a merged one opaque (an optimisation of
    # ovl_create_upper), so the kernel engine's layer may say so of a directory diff added
    added_dirs = {p.lstrip("/") for kind, p in diff if kind == "A"}
    opaque = {n for n in names - expected
              if n.endswith("/.wh..wh..opq") and n.rpartition("/")[0] in added_dirs}
    assert names - opaque == expected
    # and the committed image knows bob
    assert strata.out("run", "--rm", "debian:with-bob", "id", "bob") == \
        "uid=1234(bob) gid=1234(bob) groups=1234(bob)\n"
    home = strata.out("run", "--rm", "-u", "bob", "-w", "/home/bob", "debian:with-bob", "sh",
                      "-c", "id -un; pwd; echo $HOME; touch mine && ls -l mine | cut -d' ' -f3")
    assert home == "bob\n/home/bob\n/home/bob\nbob\n"
    strata("rm", "adduser")
    strata("rmi", "debian:with-bob")


def test_an_imported_rootfs_without_a_command_is_refused(
        debian_strata: tuple[Strata, str]) -> None:
    strata, image = debian_strata
    proc = strata("run", "--rm", image, check=False)
    assert proc.returncode == 125
    assert proc.stderr.decode() == ("Error: no command specified (the image has no Entrypoint "
                                    "or Cmd)\n")
