"""kill -9 at random points of pull, load, import, commit, rmi, image prune and copy-up.

Each loop runs the command, SIGKILLs it after a random delay drawn uniformly from its own
measured duration (``KILLS`` kills per command: at least 50 in CI, ``STRATA_LONG_TESTS=1``
makes it 200), and after every kill checks that:

* the store is not damaged: ``strata check`` reports nothing but the residue a SIGKILL must
  leave (temp files in tmp/, a copy-up in the container's work dir, the record of a mount
  whose daemon died) — never a blob, layer, image, tag or container problem;
* every tag resolves to an image whose config parses and whose layers open;
* re-running the command succeeds (for rmi: the image is gone, by the killed run or the
  re-run; ``image prune`` then collects what the killed collection left);
* after the re-run ``strata check`` is clean: the re-run swept the residue.

A run the kill came too late for must have succeeded, and leave a clean store.  The stores
live in a tmpfs (``ram_warm``): a SIGKILL needs no fsync to be survived, and the loops stay
within the CI budget (about 2.5 minutes for the seven of them on two cores).

Copy-up is killed by killing the mount daemon while a write to a large lower file copies it
up: the upper never holds a partial copy, ``strata umount`` clears the dead mount, and the
next mount starts from an empty work dir.
"""

from __future__ import annotations

import errno
import os
import random
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from imagestore import Store
from tests.builders import busybox_entries, d, file, oci_layout, tar_bytes
from tests.forkserver import Result, Warm, WarmMount, mounted
from tests.registry_images import upload_layout

LONG = bool(os.environ.get("STRATA_LONG_TESTS"))
KILLS = 200 if LONG else 50
MB = 1 << 20
RESIDUE = ("leftover of an interrupted command", "leftover(s) in work/",
           "whose daemon (pid", "partial download of a blob that is stored")


def payload(seed: int, size: int) -> bytes:
    return random.Random(seed).randbytes(size)


def check_lines(strata: Warm) -> tuple[int, list[str]]:
    proc = strata("check", check=False)
    return proc.returncode, proc.stdout.decode(errors="replace").splitlines()


def assert_undamaged(strata: Warm) -> bool:
    """No damage; returns whether the kill left residue (for the loop's statistics)."""
    _, lines = check_lines(strata)
    damage = [line for line in lines if not any(r in line for r in RESIDUE)]
    assert not damage, "\n".join(damage)
    store = Store(str(strata.root))
    for tag in store.state.read().tags:
        image = store.resolve(tag)
        assert image.config.diff_ids is not None
        with store.layers.opened(store.layers.stack(image.diff_ids)) as layers:
            assert len(layers) == len(image.diff_ids)
    return bool(lines)


def assert_clean(strata: Warm) -> None:
    rc, lines = check_lines(strata)
    assert rc == 0, "\n".join(lines)


@dataclass
class Loop:
    """One kill loop: ``args`` is the command; ``before`` readies each round, ``rerun``
    completes the work after a kill."""

    strata: Warm
    args: tuple[str, ...]
    before: Callable[[], None] = lambda: None
    rerun: Callable[[], None] | None = None
    after_kill: Callable[[], None] = lambda: None
    durations: list[float] = field(default_factory=list)
    killed: int = 0
    finished: int = 0
    residue: int = 0

    def measure(self, rounds: int = 2) -> float:
        for _ in range(rounds):
            self.before()
            result = self.strata(*self.args)
            self.durations.append(result.elapsed)
        return statistics.median(self.durations)

    def run(self, kills: int, seed: int) -> None:
        rng = random.Random(seed)
        span = self.measure()
        rounds = 0
        while self.killed < kills:
            rounds += 1
            assert rounds < kills * 3, f"only {self.killed} of {rounds} runs were killed"
            self.before()
            run = self.strata.start(*self.args)
            time.sleep(rng.uniform(0, span))
            self.strata.server.kill(run)
            result: Result = self.strata.server.wait(run, 120)
            self.after_kill()
            if result.returncode != -9:  # it finished before the kill came
                assert result.returncode == 0, result.stderr.decode(errors="replace")
                self.finished += 1
                assert_clean(self.strata)
                continue
            self.killed += 1
            self.residue += assert_undamaged(self.strata)
            if self.rerun is not None:
                self.rerun()
            else:
                self.strata(*self.args)
            assert_clean(self.strata)
        print(f"{' '.join(self.args[:2])}: {self.killed} kills in {rounds} runs, "
              f"{self.residue} left residue (span {span:.2f}s)")


def big_layers(n: int, size: int, seed: int) -> list[bytes]:
    return [tar_bytes([d(f"l{i}"), *(file(f"l{i}/f{j}", payload(seed + i * 10 + j, size // 4))
                                     for j in range(4))]) for i in range(n)]


def _rmi_if_present(strata: Warm, name: str) -> None:
    if strata("inspect", name, check=False).returncode == 0:
        strata("rmi", "-f", name)


# -- the loops -------------------------------------------------------------------------------------


def test_kill_import(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    src = tmp_path / "rootfs.tar.gz"
    import gzip

    src.write_bytes(gzip.compress(big_layers(1, 8 * MB, 1)[0], compresslevel=1))
    loop = Loop(warm, ("import", str(src), "imp:1"), before=lambda: _rmi_if_present(warm,
                                                                                  "imp:1"))
    loop.run(KILLS, seed=1)


def test_kill_load(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    oci_layout(str(tmp_path / "layout"), big_layers(3, 3 * MB, 2), tag="v1",
               compression="gzip")
    image = warm.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    warm("save", "-o", str(tmp_path / "img.tar"), image)
    warm("rmi", image)

    def clear() -> None:
        for line in warm.out("images", "-q", "-a", "--no-trunc").split():
            warm("rmi", "-f", line)

    loop = Loop(warm, ("load", "-i", str(tmp_path / "img.tar")), before=clear)
    loop.run(KILLS, seed=2)


@pytest.mark.registry
def test_kill_pull(ram_warm: Warm, tmp_path: Path, registry: Any) -> None:
    warm = ram_warm
    layout = tmp_path / "layout"
    oci_layout(str(layout), big_layers(3, 3 * MB, 3), tag="v1", compression="gzip")
    repo = f"crash/pull-{os.getpid()}"
    upload_layout(registry.host, str(layout), repo, "v1")
    ref = f"{registry.host}/{repo}:v1"
    loop = Loop(warm, ("pull", "-q", ref), before=lambda: _rmi_if_present(warm, ref))
    loop.run(KILLS, seed=3)


def test_kill_commit(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    base = tar_bytes(busybox_entries())
    oci_layout(str(tmp_path / "layout"), [base], tag="v1")
    image = warm.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    cid = warm.out("create", "--name", "box", image).strip()
    upper = warm.root / "containers" / cid / "upper"
    for i in range(6):
        (upper / f"data{i}").write_bytes(payload(100 + i, 2 * MB))
    (upper / "etc").mkdir()
    (upper / "etc/passwd").write_bytes(b"changed\n")
    os.mknod(upper / "bin", 0o600 | 0o020000, 0)  # a whiteout
    loop = Loop(warm, ("commit", "--compression", "none", "box", "committed:1"),
                before=lambda: _rmi_if_present(warm, "committed:1"))
    loop.run(KILLS, seed=4)


def _many_images(warm: Warm, tmp_path: Path) -> Path:
    """An archive of three tagged images sharing a base, with many small layers (a long
    collection to be killed in)."""
    base = big_layers(1, 1 * MB, 5)
    small = [tar_bytes([file(f"s{i}/f", payload(i, 20_000))]) for i in range(18)]
    names = []
    for n, extra in enumerate((small[:6], small[6:15], small[15:])):
        layout = tmp_path / f"layout{n}"
        oci_layout(str(layout), base + extra, tag="v1")
        image = warm.out("load", "-i", str(layout)).split()[-1]
        warm("tag", image, f"many:{n}")
        names.append(f"many:{n}")
    archive = tmp_path / "many.tar"
    warm("save", "-o", str(archive), *names)
    return archive


def test_kill_rmi(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    archive = _many_images(warm, tmp_path)

    def rerun() -> None:
        _rmi_if_present(warm, "many:1")
        warm("image", "prune", "-f")  # collects what a killed collection left

    loop = Loop(warm, ("rmi", "many:1"), before=lambda: warm("load", "-i", str(archive)),
                rerun=rerun)
    loop.run(KILLS, seed=6)
    assert sorted(warm.out("images", "--format", "{{.Tag}}").split()) == ["0", "2"]


def test_kill_prune(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    archive = _many_images(warm, tmp_path)
    warm("create", "--name", "keeper", "many:2")  # prune -a keeps what a container uses
    loop = Loop(warm, ("image", "prune", "-a", "-f"),
                before=lambda: warm("load", "-i", str(archive)))
    loop.run(KILLS, seed=7)
    assert warm.out("images", "--format", "{{.Repository}}:{{.Tag}}").split() == ["many:2"]


@pytest.mark.fuse
def test_kill_copy_up(ram_warm: Warm, tmp_path: Path) -> None:
    warm = ram_warm
    big = payload(8, 32 * MB)
    layer = tar_bytes([*busybox_entries(), file("big", big)])
    oci_layout(str(tmp_path / "layout"), [layer], tag="v1")
    image = warm.out("load", "-i", str(tmp_path / "layout")).split()[-1]
    cid = warm.out("create", "--name", "cu", image).strip()
    upper = warm.root / "containers" / cid / "upper"
    mp = tmp_path / "mp"
    rng = random.Random(9)

    def write(errors: list[BaseException]) -> None:
        try:
            fd = os.open(mp / "big", os.O_WRONLY)
            try:
                os.pwrite(fd, b"!", 0)
            finally:
                os.close(fd)
        except OSError as exc:
            if exc.errno not in (errno.ENOTCONN, errno.EIO, errno.ECONNABORTED):
                errors.append(exc)

    def upper_is_whole() -> None:
        if (upper / "big").exists():  # a copy-up is all or nothing
            data = (upper / "big").read_bytes()
            assert len(data) == len(big) and data[1:] == big[1:] and data[:1] in (b"!", big[:1])

    span = []
    for _ in range(2):  # measure: mount, copy up, unmount
        (upper / "big").unlink(missing_ok=True)
        with WarmMount(warm, "cu", mp):
            t0 = time.monotonic()
            errs: list[BaseException] = []
            write(errs)
            span.append(time.monotonic() - t0)
            assert not errs
    killed = interrupted = 0
    while killed < KILLS:
        (upper / "big").unlink(missing_ok=True)
        m = WarmMount(warm, "cu", mp)
        errs = []
        writer = threading.Thread(target=write, args=(errs,))
        writer.start()
        time.sleep(rng.uniform(0, max(span)))
        warm.server.kill(m.run)
        writer.join(30)
        assert not writer.is_alive() and not errs, errs
        result = warm.server.wait(m.run, 30)
        killed += result.returncode == -9
        interrupted += not (upper / "big").exists()
        if mounted(mp):
            warm("umount", str(mp))  # clears a mount whose daemon is gone
        assert not mounted(mp)
        upper_is_whole()
        assert_undamaged(warm)
        with WarmMount(warm, "cu", mp):  # the re-run: a new daemon, an empty work dir
            assert os.listdir(warm.root / "containers" / cid / "work/work") == []
            write(errs)
            assert not errs and (mp / "big").read_bytes()[:1] == b"!"
        upper_is_whole()
        assert_clean(warm)
    print(f"copy-up: {killed} daemon kills, {interrupted} before the copy-up ended "
          f"(span {max(span):.2f}s)")
    assert interrupted >= KILLS // 5, f"only {interrupted} kills came before the copy-up ended"
