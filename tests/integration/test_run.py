"""``strata run`` through the real crun on real images (tests/run_images.py): exit statuses,
the image config and the flags that override it, users and groups, standard input, isolation,
what reaches ``diff`` and ``commit`` and what does not, re-running a container, ``--rm``, and
what a failed start leaves behind (nothing mounted, ``strata check`` clean)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import REPO, Mounter, Strata
from tests.run_images import IMAGE_PATH

pytestmark = [pytest.mark.fuse, pytest.mark.root, pytest.mark.runtime]

BUSYBOX = "run/busybox:1"
CONFIGURED = "run/configured:1"


def run(strata: Strata, *args: str, input: bytes | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[bytes]:
    return strata("run", *args, input=input, check=False, env=env)


def out(proc: subprocess.CompletedProcess[bytes]) -> str:
    assert proc.returncode == 0, proc.stderr.decode()
    return proc.stdout.decode()


def fuse_mounts_below(path: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        return [ln.split()[4] for ln in f
                if ln.split()[4].startswith(str(path)) and " - fuse" in ln]


def assert_clean(strata: Strata) -> None:
    """No mount of the store anywhere, no mount record, and ``strata check`` is clean."""
    assert fuse_mounts_below(strata.root) == []
    assert strata.out("mounts", "-q") == ""
    check = strata("check", check=False)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()


# -- exit statuses -------------------------------------------------------------------------------


def test_exit_status_is_the_commands(run_strata: Strata) -> None:
    assert run(run_strata, "--rm", BUSYBOX, "true").returncode == 0
    assert run(run_strata, "--rm", BUSYBOX, "false").returncode == 1
    assert run(run_strata, "--rm", BUSYBOX, "sh", "-c", "exit 42").returncode == 42


def test_a_command_not_found_is_127_and_one_line(run_strata: Strata) -> None:
    proc = run(run_strata, "--rm", BUSYBOX, "nothere")
    assert proc.returncode == 127
    lines = proc.stderr.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: crun: executable file `nothere`")
    assert proc.stdout == b""
    assert run(run_strata, "--rm", BUSYBOX, "sh", "-c", "nothere").returncode == 127  # the shell's


def test_a_command_that_cannot_be_executed_is_126(run_strata: Strata) -> None:
    for path in ("/etc/passwd", "/etc"):  # not executable; a directory
        proc = run(run_strata, "--rm", BUSYBOX, path)
        assert proc.returncode == 126, proc.stderr
        assert len(proc.stderr.decode().splitlines()) == 1


def test_a_command_killed_by_a_signal_is_128_plus_n(run_strata: Strata) -> None:
    from tests.run_images import find_child

    with background(run_strata, "--rm", BUSYBOX, "sleep", "300") as proc:
        init = _wait_for(lambda: find_child(proc.pid, "sleep"))
        os.kill(init, 9)
        assert proc.wait(60) == 128 + 9
    assert_clean(run_strata)


@contextlib.contextmanager
def background(strata: Strata, *args: str) -> Iterator[subprocess.Popen[bytes]]:
    """``strata run ARGS`` in the background; killed (if still running) and reaped after."""
    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(strata.root),
                             "run", *args], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _wait_for(probe, timeout: float = 60.0):  # type: ignore[no-untyped-def]
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = probe()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError("timed out")


# -- the image config and the flags --------------------------------------------------------------


def test_env_workdir_and_user_come_from_the_image_config(run_strata: Strata) -> None:
    proc = run(run_strata, "--name", "cfg", CONFIGURED)
    assert out(proc) == ("hello from the image\n/srv/app\n"
                         "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users)\n")
    env = out(run(run_strata, "--rm", CONFIGURED, "env")).splitlines()
    assert f"PATH={IMAGE_PATH}" in env and "GREETING=hello from the image" in env
    assert "HOME=/home/alice" in env
    assert [len(e) for e in env if e.startswith("HOSTNAME=")] == [len("HOSTNAME=") + 12]
    # the missing WorkingDir was made in the writable layer, as docker makes it
    assert run_strata.out("diff", "cfg").splitlines() == ["C /srv", "A /srv/app"]
    run_strata("rm", "cfg")


def _short_id(strata: Strata, name: str) -> str:
    return strata.out("ps", "--format", "{{.ID}} {{.Names}}").split(f" {name}")[0][-12:]


def test_flags_override_the_image_config(run_strata: Strata, tmp_path: Path) -> None:
    env_file = tmp_path / "env"
    env_file.write_text("# comment\n\nFROM_FILE=yes\nGREETING=from the file\nCALLER\n")
    proc = run(run_strata, "--rm", "-e", "GREETING=from a flag", "-e", "CALLER", "-e", "UNSET",
               "--env-file", str(env_file), "-w", "/tmp", "-u", "root", CONFIGURED,
               'echo "$GREETING/$FROM_FILE/$CALLER/${UNSET-unset}"; pwd; id -u',
               env={"CALLER": "from the caller"})
    assert out(proc) == "from a flag/yes/from the caller/unset\n/tmp\n0\n"
    # --entrypoint replaces the image's and drops its Cmd; a command replaces Cmd
    assert out(run(run_strata, "--rm", "--entrypoint", "echo", CONFIGURED)) == "\n"
    assert out(run(run_strata, "--rm", "--entrypoint", "echo", CONFIGURED, "a", "b")) == "a b\n"
    assert out(run(run_strata, "--rm", CONFIGURED, "echo $0")) == "/bin/sh\n"
    proc = run(run_strata, "--rm", "--entrypoint", "", CONFIGURED)
    assert proc.returncode == 125 and b"no command specified" in proc.stderr
    env = out(run(run_strata, "--rm", "-h", "named", BUSYBOX, "env")).splitlines()
    assert "HOSTNAME=named" in env and "HOME=/root" in env and f"PATH={IMAGE_PATH}" in env


def test_id_reports_the_resolved_user_and_groups(run_strata: Strata) -> None:
    cases = {
        (): "uid=0(root) gid=0(root) groups=0(root),10(wheel)",
        ("-u", "alice"): "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users)",
        ("-u", "1000"): "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users)",
        ("-u", "alice:users"): "uid=1000(alice) gid=100(users)",
        ("-u", "1000:10"): "uid=1000(alice) gid=10(wheel)",
        ("-u", "4242"): "uid=4242 gid=0(root)",
        ("-u", "4242:4343"): "uid=4242 gid=4343",
        ("-u", "nobody", "--group-add", "users"): "uid=65534(nobody) gid=65534(nogroup) "
                                                  "groups=100(users)",
    }
    for flags, expected in cases.items():
        assert out(run(run_strata, "--rm", *flags, BUSYBOX, "id")) == expected + "\n", flags
    for flags, message in ((("-u", "mallory"), "unable to find user mallory"),
                           (("-u", "alice:nogrp"), "unable to find group nogrp")):
        proc = run(run_strata, "--rm", *flags, BUSYBOX, "id")
        assert proc.returncode == 125
        assert proc.stderr.decode().splitlines() == [f"Error: {message}: no matching entries in "
                                                     f"{'passwd' if 'user' in message else 'group'}"
                                                     " file"]


def test_stdin_is_passed_with_i_only(run_strata: Strata) -> None:
    data = b"line one\nline two\n" * 1000
    proc = run(run_strata, "--rm", "-i", BUSYBOX, "sh", "-c", "cat; echo done >&2", input=data)
    assert proc.returncode == 0 and proc.stdout == data and proc.stderr == b"done\n"
    proc = run(run_strata, "--rm", BUSYBOX, "cat", input=data)  # no -i: /dev/null
    assert proc.returncode == 0 and proc.stdout == b""


# -- isolation -----------------------------------------------------------------------------------


def test_the_container_sees_its_own_pids_hostname_and_only_lo(run_strata: Strata) -> None:
    script = ("ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '; echo; hostname; "
              "cat /etc/hostname; ls /sys/class/net; cat /sys/class/net/lo/flags; "
              "ip -o link show up | cut -d' ' -f2")
    proc = run(run_strata, "--name", "iso", BUSYBOX, "sh", "-c", script)
    pids, hostname, etc_hostname, net, flags, up = out(proc).splitlines()
    # sh as pid 1 and the pipeline's five: none of the host's thousands of processes
    assert pids.split() == [str(n) for n in range(1, len(pids.split()) + 1)]
    assert len(pids.split()) <= 6
    assert hostname == etc_hostname == _short_id(run_strata, "iso")
    assert net == "lo" and int(flags, 16) & 1  # IFF_UP
    assert up == "lo:"
    run_strata("rm", "iso")
    named = out(run(run_strata, "--rm", "--hostname", "box", BUSYBOX, "sh", "-c",
                    "hostname; cat /etc/hostname; grep -c box /etc/hosts"))
    assert named == "box\nbox\n1\n"


def test_network_host_shares_the_hosts_network(run_strata: Strata) -> None:
    proc = run(run_strata, "--rm", "--network", "host", BUSYBOX, "sh", "-c",
               "ls /sys/class/net | sort; echo ---; cat /etc/resolv.conf; echo ---; hostname")
    net, resolv, hostname = out(proc).split("---\n")
    assert net.split() == sorted(os.listdir("/sys/class/net"))
    with open("/etc/resolv.conf") as f:
        assert resolv.rstrip("\n") == f.read().rstrip("\n")
    assert hostname == socket.gethostname() + "\n"


def test_capabilities_masked_paths_and_seccomp_are_dockers(run_strata: Strata) -> None:
    def status(*flags: str) -> dict[str, str]:
        text = out(run(run_strata, "--rm", *flags, BUSYBOX, "cat", "/proc/self/status"))
        return dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)

    default = status()
    assert default["CapEff"] == default["CapBnd"] == "00000000a80425fb"  # docker's 14
    assert default["Seccomp"] == "2" and default["NoNewPrivs"] == "0"
    assert status("-u", "alice")["CapEff"] == "0000000000000000"
    assert status("--cap-drop", "ALL")["CapBnd"] == "0000000000000000"
    added = status("--cap-add", "NET_ADMIN", "--cap-drop", "chown")
    assert int(added["CapEff"], 16) == (0xa80425fb | 1 << 12) & ~1  # CAP_NET_ADMIN, CAP_CHOWN
    assert status("--security-opt", "seccomp=unconfined")["Seccomp"] == "0"
    assert status("--security-opt", "no-new-privileges")["NoNewPrivs"] == "1"
    with open("/proc/self/status") as f:  # every capability strata itself may pass on
        every = int(next(ln for ln in f if ln.startswith("CapBnd:")).split()[1], 16)
    assert int(status("--privileged")["CapEff"], 16) == every
    masked = out(run(run_strata, "--rm", BUSYBOX, "sh", "-c",
                     "wc -c < /proc/timer_list; grep -E ' /proc/(sys|timer_list) ' /proc/mounts"))
    size, *mounts = masked.splitlines()
    with open("/proc/timer_list", "rb") as f:
        assert f.read(1)  # the host's is not empty; the container's is /dev/null
    assert size.strip() == "0"
    assert {m.split()[1]: m.split()[3].split(",")[0] for m in mounts} == {
        "/proc/sys": "ro", "/proc/timer_list": "ro"}


# -- what reaches diff and commit ----------------------------------------------------------------


def test_a_written_file_shows_in_diff_and_commit_mount_targets_do_not(
        run_strata: Strata, mounter: Mounter, tmp_path: Path) -> None:
    host = tmp_path / "shared"
    host.mkdir()
    (host / "from-host").write_text("host data\n")
    hostfile = tmp_path / "config.ini"
    hostfile.write_text("k=v\n")
    script = ("echo written > /srv/new; cat /mnt/data/from-host /opt/config.ini; "
              "echo back > /mnt/data/from-container; touch /scratch/tmp; cat /etc/hosts >/dev/null")
    proc = run(run_strata, "--name", "w", "-v", f"{host}:/mnt/data", "-v",
               f"{hostfile}:/opt/config.ini:ro", "--tmpfs", "/scratch", BUSYBOX, "sh", "-c",
               script)
    assert out(proc) == "host data\nk=v\n"
    assert (host / "from-container").read_text() == "back\n"
    assert run_strata.out("diff", "w").splitlines() == ["C /srv", "A /srv/new"]
    image = run_strata.out("commit", "w", "committed:1").strip()
    squashed = run_strata.out("commit", "--squash", "w", "squashed:1").strip()
    for what in (image, squashed, "w"):  # the committed images and the container itself
        exported = tmp_path / "rootfs.tar"
        run_strata("export", what, "-o", str(exported))
        names = {n.removeprefix("./").rstrip("/") for n in subprocess.run(
            ["tar", "-tf", str(exported)], capture_output=True, text=True,
            check=True).stdout.split()}
        assert "srv/new" in names and "etc/passwd" in names
        for target in ("etc/hosts", "etc/hostname", "mnt", "mnt/data", "opt",
                       "opt/config.ini", "scratch", "proc", "sys", "dev"):
            assert target not in names, (what, target)
    # the merged view of the container shows the image's own directories unchanged
    mp_image = mounter.mount(BUSYBOX, at=mounter.mountpoint("image"))
    mp_container = mounter.mount("w", at=mounter.mountpoint("container"))
    for d in ("etc",):  # (the root changed: the command wrote /srv)
        a, b = os.stat(mp_image / d), os.stat(mp_container / d)
        assert (a.st_mode, a.st_uid, a.st_gid, a.st_mtime_ns) == \
            (b.st_mode, b.st_uid, b.st_gid, b.st_mtime_ns), d
    assert (mp_container / "etc/hosts").read_bytes() == b""  # the stub, not the content
    assert not (mp_image / "etc/hosts").exists()
    mounter.umount(mp_container)
    assert out(run(run_strata, "--rm", "committed:1", "cat", "/srv/new")) == "written\n"
    run_strata("rm", "w")


def test_an_existing_container_runs_again_with_its_layer(run_strata: Strata) -> None:
    assert run(run_strata, "--name", "again", BUSYBOX, "sh", "-c",
               "echo 1 > /count").returncode == 0
    cid = run_strata.out("ps", "-q", "--no-trunc").split()[0]
    assert out(run(run_strata, "again", "sh", "-c", "cat /count; echo 2 >> /count")) == "1\n"
    assert out(run(run_strata, cid[:12], "cat", "/count")) == "1\n2\n"
    assert out(run(run_strata, cid, "echo", "by id")) == "by id\n"
    proc = run(run_strata, "--name", "other", "again", "true")
    assert proc.returncode == 125 and b"--name is for a new container" in proc.stderr
    assert run_strata.out("diff", "again").splitlines() == ["A /count"]
    status = run_strata.out("ps", "--format", "{{.Status}}")
    assert status.startswith("Exited (0)")
    run_strata("rm", "again")


def test_a_mounted_container_is_refused_before_its_init_layer_is_touched(
        run_strata: Strata, mounter: Mounter, tmp_path: Path) -> None:
    """The init layer is rebuilt only under the container's mount lock: a run refused because
    the container is mounted leaves the layer that mount serves as it was."""
    host = tmp_path / "host"
    host.mkdir()
    assert run(run_strata, "--name", "m", "-v", f"{host}:/data", BUSYBOX, "true").returncode == 0
    init = run_strata.root / "containers" / run_strata.out("ps", "-q", "--no-trunc").strip() / \
        "init"
    before = os.stat(init).st_ino
    mp = mounter.mount("m", at=mounter.mountpoint("m"))
    proc = run(run_strata, "-v", f"{host}:/other", "m", "true")
    assert proc.returncode == 125 and b"mounted" in proc.stderr
    assert os.stat(init).st_ino == before and (init / "data").is_dir()
    assert not (init / "other").exists()
    assert (mp / "data").is_dir() and os.listdir(mp / "data") == []  # the stub, served
    mounter.umount(mp)
    run_strata("rm", "m")


def test_rm_leaves_no_container_no_upper_no_mount(run_strata: Strata) -> None:
    assert out(run(run_strata, "--rm", BUSYBOX, "sh", "-c", "echo x > /f; echo ok")) == "ok\n"
    assert run_strata.out("ps", "-q") == ""
    assert os.listdir(run_strata.root / "containers") == []
    assert_clean(run_strata)
    # also when the command fails, and when it is not found
    assert run(run_strata, "--rm", BUSYBOX, "false").returncode == 1
    assert run(run_strata, "--rm", BUSYBOX, "nothere").returncode == 127
    assert os.listdir(run_strata.root / "containers") == []
    assert_clean(run_strata)


def test_a_runtime_that_fails_to_start_leaves_nothing_mounted(run_strata: Strata,
                                                              tmp_path: Path) -> None:
    proc = run(run_strata, "--name", "bad", BUSYBOX, "nothere")
    assert proc.returncode == 127
    assert_clean(run_strata)
    assert run_strata.out("ps", "--format", "{{.Names}} {{.Status}}") == "bad Created\n"
    # a mount the runtime refuses: a file over a directory
    hostfile = tmp_path / "file"
    hostfile.write_text("x")
    proc = run(run_strata, "--rm", "-v", f"{hostfile}:/etc", BUSYBOX, "true")
    assert proc.returncode == 125
    assert len(proc.stderr.decode().splitlines()) == 1 and proc.stderr.startswith(
        b"Error: crun: ")
    assert_clean(run_strata)
    assert run_strata.out("diff", "bad") == ""
    run_strata("rm", "bad")


def test_ps_shows_a_running_container_and_rm_f_stops_it(run_strata: Strata) -> None:
    with background(run_strata, "--name", "busy", BUSYBOX, "sleep", "300") as proc:
        status = _wait_for(lambda: [s for s in run_strata.out(
            "ps", "--format", "{{.Names}} {{.Status}}").splitlines() if " Up " in s])
        assert status[0].startswith("busy Up ")
        assert run(run_strata, "busy", "true").returncode == 125  # running: not twice
        run_strata("rm", "-f", "busy")
        assert proc.wait(30) == 137
    assert run_strata.out("ps", "-q") == ""
    assert_clean(run_strata)


@contextlib.contextmanager
def killed_run(strata: Strata, name: str) -> Iterator[int]:
    """``strata run --name NAME busybox sleep 300`` killed with SIGKILL once the command runs;
    yields the command's pid.  (Its streams go to /dev/null: the orphan holds them.)"""
    from tests.run_images import find_child

    proc = subprocess.Popen([sys.executable, "-m", "cli.main", "--root", str(strata.root),
                             "run", "--name", name, BUSYBOX, "sleep", "300"],
                            env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        init = _wait_for(lambda: find_child(proc.pid, "sleep"))
        _wait_for(lambda: " Up " in strata.out("ps", "--format", "{{.Names}} {{.Status}}"))
    finally:
        proc.kill()
        proc.wait(30)
    try:
        yield init
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(init, 9)


def running(pid: int) -> bool:
    """``pid`` exists and is no zombie (an orphan's parent here may never reap it)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except OSError:
        return False


def test_a_killed_strata_run_is_reported_by_check_and_repaired(run_strata: Strata) -> None:
    """SIGKILL to ``strata run`` leaves the runtime's state and its command running, orphaned
    (without its root file system: the mount ended with its lifeline, and the command dies at
    its next access to it): ``ps`` says so, another run is refused while the command lives,
    ``check`` reports the runtime's leftover and ``--repair`` ends it."""
    with killed_run(run_strata, "orphan") as init:
        cid = run_strata.out("ps", "-q", "--no-trunc").strip()
        assert (run_strata.root / "runtime" / "crun" / cid).is_dir()
        status = run_strata.out("ps", "--format", "{{.Status}}")
        alive = running(init)
        if alive:
            assert status.startswith("Up ") and "orphaned" in status, status
            again = run(run_strata, "orphan", "true")
            assert again.returncode == 125 and b"already running" in again.stderr
        else:
            assert status == "Exited (unknown)\n"
        check = run_strata("check", check=False)
        report = check.stdout.decode() + check.stderr.decode()
        assert check.returncode != 0
        assert f"runtime {cid[:12]}: crun still holds container orphan" in report, report
        repair = run_strata("check", "--repair", check=False)
        assert repair.returncode == 0, repair.stdout.decode() + repair.stderr.decode()
        assert not running(init)
        assert not (run_strata.root / "runtime" / "crun" / cid).exists()
        assert run_strata.out("ps", "--format", "{{.Status}}") == "Exited (unknown)\n"
        assert_clean(run_strata)
        assert out(run(run_strata, "orphan", "echo", "again")) == "again\n"  # runs again
        run_strata("rm", "orphan")
        assert_clean(run_strata)


def test_rm_f_ends_a_container_whose_strata_run_was_killed(run_strata: Strata) -> None:
    with killed_run(run_strata, "orphan") as init:
        if running(init):  # running, though not mounted: rm alone refuses, as docker's
            proc = run_strata("rm", "orphan", check=False)
            assert proc.returncode == 1 and b"is running" in proc.stderr
        run_strata("rm", "-f", "orphan")
        assert not running(init)
        assert run_strata.out("ps", "-q") == ""
        assert os.listdir(run_strata.root / "runtime" / "crun") == []
        assert_clean(run_strata)


def test_volume_read_only_and_tmpfs(run_strata: Strata, tmp_path: Path) -> None:
    (tmp_path / "ro").mkdir()
    proc = run(run_strata, "--rm", "-v", f"{tmp_path / 'ro'}:/data:ro", "--tmpfs",
               "/scratch:size=1m", BUSYBOX, "sh", "-c",
               "touch /data/x 2>/dev/null || echo refused; echo y > /scratch/y; cat /scratch/y; "
               "grep ' /scratch ' /proc/mounts | cut -d' ' -f3")
    assert out(proc) == "refused\ny\ntmpfs\n"
    assert os.listdir(tmp_path / "ro") == []


# -- refusals ------------------------------------------------------------------------------------


def test_a_non_root_user_gets_one_line(run_strata: Strata) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                           sys.executable, "-m", "cli.main", "--root", "/nonexistent",
                           "run", BUSYBOX, "true"], capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, cwd="/")
    assert proc.returncode == 125
    assert proc.stderr.decode().splitlines() == [
        "Error: strata run needs root (the OCI runtime makes namespaces and mounts)"]


def test_a_missing_runtime_gets_one_line_naming_the_package(run_strata: Strata,
                                                            tmp_path: Path) -> None:
    proc = run(run_strata, "--rm", BUSYBOX, "true", env={"PATH": str(tmp_path)})
    assert proc.returncode == 125
    assert proc.stderr.decode().splitlines() == [
        "Error: strata run needs an OCI runtime: crun is not installed (Debian package crun)"]
    proc = run(run_strata, "--rm", "--runtime", str(tmp_path / "nope"), BUSYBOX, "true")
    assert proc.returncode == 125 and len(proc.stderr.splitlines()) == 1
    assert run_strata.out("ps", "-q") == ""
    proc = run(run_strata, "--rm", "--runtime", shutil.which("crun") or "crun", BUSYBOX, "true")
    assert proc.returncode == 0


def test_bad_flags_get_one_line(run_strata: Strata, tmp_path: Path) -> None:
    for flags, words in ((("-v", "relative:/x"), "must be absolute"),
                         (("-v", f"{tmp_path}/missing:/x"), "does not exist"),
                         (("-w", "relative"), "absolute path"),
                         (("--cap-add", "FLY"), "unknown capability"),
                         (("--security-opt", "label=disable"), "unsupported --security-opt"),
                         (("--env-file", str(tmp_path / "none")), "cannot read env file")):
        proc = run(run_strata, "--rm", *flags, BUSYBOX, "true")
        assert proc.returncode == 125, flags
        lines = proc.stderr.decode().splitlines()
        assert len(lines) == 1 and words in lines[0], (flags, lines)
    proc = run(run_strata, "--rm", "no/such:image", "true")
    assert proc.returncode == 125
    assert proc.stderr.decode() == "Error: No such image or container: no/such:image\n"
    assert run_strata.out("ps", "-q") == ""


def test_the_spec_is_what_crun_ran(run_strata: Strata) -> None:
    """The bundle's config.json stays with the container: the runtime spec as generated."""
    run(run_strata, "--name", "spec", "-e", "A=1", CONFIGURED, "true")
    cid = run_strata.out("ps", "-q", "--no-trunc").split()[0]
    spec = json.loads((run_strata.root / "containers" / cid / "run" / "config.json").read_text())
    assert spec["process"]["args"] == ["/bin/sh", "-c", "true"]
    assert spec["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10, 100]}
    assert spec["process"]["cwd"] == "/srv/app"
    assert "A=1" in spec["process"]["env"]
    assert {n["type"] for n in spec["linux"]["namespaces"]} >= {"pid", "ipc", "uts", "mount",
                                                                "network"}
    assert [m["destination"] for m in spec["mounts"]][:3] == ["/proc", "/dev", "/sys"]
    run_strata("rm", "spec")


def test_runc_runs_the_same_containers(run_strata: Strata) -> None:
    """``--runtime runc``: the other runtime docker and podman use takes the same spec."""
    from tests.conftest import require_tool

    require_tool("runc")
    assert out(run(run_strata, "--rm", "--runtime", "runc", "-u", "alice", "-w", "/made",
                   "-e", "A=1", BUSYBOX, "sh", "-c", "id; pwd; echo $A; hostname -s | wc -c; "
                   "ls /sys/class/net")) == (
        "uid=1000(alice) gid=1000(alice) groups=10(wheel),100(users)\n/made\n1\n13\nlo\n")
    assert run(run_strata, "--rm", "--runtime", "runc", BUSYBOX, "sh", "-c",
               "exit 5").returncode == 5
    proc = run(run_strata, "--rm", "--runtime", "runc", BUSYBOX, "nothere")
    assert proc.returncode == 127 and proc.stderr.startswith(b"Error: runc: ")
    assert len(proc.stderr.splitlines()) == 1
    assert out(run(run_strata, "--rm", "-i", "--runtime", "runc", BUSYBOX, "cat",
                   input=b"through runc\n")) == "through runc\n"
    assert_clean(run_strata)
