"""The runtime spec's rules without a runtime: docker's Entrypoint/Cmd and Env rules, runc's
user resolution, the flag parsers, capabilities, mount order and stubs, symlinks resolved inside
the rootfs (a hostile image cannot point strata at the host), and the seccomp conversion."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from imagestore import runtime, runtime_seccomp, runtime_user
from imagestore.runtime import Bind, RunError, RunOptions, Tmpfs, Volume
from imagestore.runtime_user import ExecUser, RootView
from tests.memlayer import DIR, Link, MemLayer
from unionfs.resolve import UnionView

PASSWD = (b"root:x:0:0:root:/root:/bin/sh\n"
          b"# a comment\n"
          b"alice:x:1000:1000:Alice:/home/alice:/bin/sh\n"
          b"broken line\n"
          b"bob:x:1001:100::/home/bob:/bin/sh\n")
GROUP = (b"root:x:0:root\n"
         b"wheel:x:10:root,alice\n"
         b"users:x:100:alice,bob\n"
         b"alice:x:1000:\n")


@pytest.mark.parametrize(("config", "opts", "expected"), [
    ({"Cmd": ["sh"]}, RunOptions(), ["sh"]),
    ({"Entrypoint": ["ep"], "Cmd": ["a"]}, RunOptions(), ["ep", "a"]),
    ({"Entrypoint": ["ep"], "Cmd": ["a"]}, RunOptions(command=("b",)), ["ep", "b"]),
    ({"Entrypoint": ["ep"], "Cmd": ["a"]}, RunOptions(entrypoint=("x",)), ["x"]),
    ({"Entrypoint": ["ep"], "Cmd": ["a"]}, RunOptions(entrypoint=("x",), command=("y",)),
     ["x", "y"]),
    ({"Entrypoint": ["ep"], "Cmd": ["a"]}, RunOptions(entrypoint=(), command=("y",)), ["y"]),
    ({"Cmd": ["/bin/sh", "-c", "echo $A"]}, RunOptions(), ["/bin/sh", "-c", "echo $A"]),
])
def test_command_line_follows_docker(config: dict[str, list[str]], opts: RunOptions,
                                     expected: list[str]) -> None:
    assert runtime.command_line(config, opts) == expected


def test_no_command_is_refused() -> None:
    for config, opts in (({}, RunOptions()), ({"Cmd": ["a"]}, RunOptions(entrypoint=()))):
        with pytest.raises(RunError, match="no command specified"):
            runtime.command_line(config, opts)


def test_environment_merges_like_docker() -> None:
    user = ExecUser(1000, 1000, (), "/home/alice", "alice")
    config = {"Env": ["A=image", "PATH=/image/bin", "B=image"]}
    env = runtime.environment(config, RunOptions(env=("B=flag", "C=flag"), tty=True), user,
                              "host1")
    assert env == ["HOSTNAME=host1", "TERM=xterm", "A=image", "PATH=/image/bin", "B=flag",
                   "C=flag", "HOME=/home/alice"]
    env = runtime.environment({}, RunOptions(env=("HOME=/x",)), user, "h")
    assert env == [f"PATH={runtime.DEFAULT_PATH}", "HOSTNAME=h", "HOME=/x"]


@pytest.mark.parametrize(("spec", "expected"), [
    ("", (0, 0, (0, 10), "/root", "root")),
    ("root", (0, 0, (0, 10), "/root", "root")),
    ("alice", (1000, 1000, (10, 100), "/home/alice", "alice")),
    ("1000", (1000, 1000, (10, 100), "/home/alice", "alice")),
    ("bob", (1001, 100, (100,), "/home/bob", "bob")),
    ("alice:users", (1000, 100, (), "/home/alice", "alice")),
    ("alice:4242", (1000, 4242, (), "/home/alice", "alice")),
    ("4242", (4242, 0, (), "/", "")),
    ("4242:wheel", (4242, 10, (), "/", "")),
])
def test_users_resolve_as_runc_resolves_them(spec: str,
                                              expected: tuple[object, ...]) -> None:
    u = runtime_user.resolve_user(spec, PASSWD, GROUP)
    assert (u.uid, u.gid, u.additional_gids, u.home, u.name) == expected


def test_unknown_names_and_bad_ids_are_errors() -> None:
    for spec, message in (("mallory", "unable to find user mallory"),
                          ("alice:staff", "unable to find group staff"),
                          ("99999999999", "out of range")):
        with pytest.raises(RunError, match=message):
            runtime_user.resolve_user(spec, PASSWD, GROUP)
    with pytest.raises(RunError, match="unable to find user alice"):
        runtime_user.resolve_user("alice", None, None)  # no /etc/passwd at all
    assert runtime_user.resolve_user("alice", PASSWD, GROUP, ["users", "7"]).additional_gids == \
        (10, 100, 7)
    with pytest.raises(RunError, match="unable to find group nope"):
        runtime_user.resolve_user("alice", PASSWD, GROUP, ["nope"])


def test_flag_parsers(tmp_path: Path) -> None:
    assert runtime.parse_volume(f"{tmp_path}:/data") == Volume(str(tmp_path), "/data")
    assert runtime.parse_volume(f"{tmp_path}:/data/../x/:ro") == Volume(str(tmp_path), "/x",
                                                                        True)
    for bad in ("rel:/x", f"{tmp_path}:rel", f"{tmp_path}:/x:rx", "/x", f"{tmp_path}/no:/x"):
        with pytest.raises(RunError):
            runtime.parse_volume(bad)
    assert runtime.parse_tmpfs("/run:size=1m,exec") == Tmpfs("/run", ("size=1m", "exec"))
    assert runtime.parse_env(["A=1", "B", "C", "D="], {"B": "from env"}) == \
        ["A=1", "B=from env", "D="]
    env_file = tmp_path / "env"
    env_file.write_text("# c\n\n  A=1\nB\n")
    assert runtime.read_env_file(str(env_file), {"B": "2"}) == ["A=1", "B=2"]
    assert runtime.cap_name("net_admin") == runtime.cap_name("CAP_NET_ADMIN") == "CAP_NET_ADMIN"
    with pytest.raises(RunError, match="unknown capability"):
        runtime.cap_name("FLY")
    with pytest.raises(RunError):
        runtime.valid_hostname("bad host")


def test_capabilities_follow_dockers_tweak() -> None:
    every = runtime.all_caps()
    assert runtime.capabilities(RunOptions()) == list(runtime.DEFAULT_CAPS)
    caps = runtime.capabilities(RunOptions(cap_add=("NET_ADMIN",), cap_drop=("MKNOD",)))
    assert "CAP_NET_ADMIN" in caps and "CAP_MKNOD" not in caps
    assert runtime.capabilities(RunOptions(cap_drop=("ALL",), cap_add=("chown",))) == \
        ["CAP_CHOWN"]
    assert runtime.capabilities(RunOptions(cap_add=("ALL",), cap_drop=("CHOWN",))) == \
        [c for c in every if c != "CAP_CHOWN"]
    assert runtime.capabilities(RunOptions(privileged=True)) == every
    assert "CAP_MKNOD" not in runtime.capabilities(RunOptions(cgroups=False))
    assert "CAP_MKNOD" in runtime.capabilities(RunOptions(cgroups=False, cap_add=("MKNOD",)))


def test_mounts_replace_defaults_and_come_parents_first(tmp_path: Path) -> None:
    opts = RunOptions(volumes=(Volume(str(tmp_path), "/data/sub", True),
                               Volume(str(tmp_path), "/dev/shm")),
                      tmpfs=(Tmpfs("/data", ("exec",)),))
    mounts = runtime.mounts(opts, [Bind("/h/hosts", "/etc/hosts")])
    dests = [m["destination"] for m in mounts]
    assert dests.count("/dev/shm") == 1
    assert dests.index("/data") < dests.index("/data/sub")
    assert dests.index("/dev") < dests.index("/dev/shm")
    shm = next(m for m in mounts if m["destination"] == "/dev/shm")
    assert shm["type"] == "bind" and shm["options"] == ["rbind", "rprivate"]
    data = next(m for m in mounts if m["destination"] == "/data")
    assert data["options"] == ["rw", "nosuid", "nodev", "exec"]
    sub = next(m for m in mounts if m["destination"] == "/data/sub")
    assert sub["options"] == ["rbind", "rprivate", "ro"]


def test_stub_targets_skip_what_another_mount_holds(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    opts = RunOptions(volumes=(Volume(str(tmp_path), "/data"),
                               Volume(str(tmp_path / "file"), "/data/inner"),
                               Volume(str(tmp_path / "file"), "/etc/app.conf"),
                               Volume(str(tmp_path), "/dev/extra")),
                      tmpfs=(Tmpfs("/proc/x"), Tmpfs("/scratch")))
    targets = runtime.stub_targets(opts, [Bind("/h/hosts", "/etc/hosts")])
    assert targets == [("/proc", True), ("/dev", True), ("/sys", True), ("/data", True),
                       ("/scratch", True), ("/etc/hosts", False), ("/etc/app.conf", False)]
    with pytest.raises(RunError, match="root directory"):
        runtime.stub_targets(RunOptions(tmpfs=(Tmpfs("/"),)), [])


def test_root_view_resolves_symlinks_inside_the_rootfs() -> None:
    view = UnionView([MemLayer({
        "etc/": DIR,
        "etc/passwd": b"root:x:0:0::/:/bin/sh\n",
        "evil/passwd": Link("/../../../../etc/passwd"),  # climbs no higher than the root
        "abs": Link("/etc"),
        "rel": Link("../etc/../etc"),
        "loop": Link("loop"),
        "usr/lib/": DIR,
        "lib": Link("usr/lib"),
        "dangling": Link("/nowhere/file"),
    })])
    root = RootView(view)
    assert root.read("/evil/passwd") == b"root:x:0:0::/:/bin/sh\n"
    assert root.resolve("/abs/passwd")[0] == "etc/passwd"
    assert root.resolve("rel/passwd")[0] == "etc/passwd"
    assert root.resolve("/lib/x/y") == ("usr/lib/x/y", None)
    assert root.resolve("/dangling") == ("nowhere/file", None)
    assert root.resolve("/../../etc")[0] == "etc"
    assert root.read("/etc") is None and root.read("/missing") is None
    with pytest.raises(RunError, match="symbolic links"):
        root.resolve("/loop/x")
    parents = root.parents("usr/lib/x/y")
    assert [(p, n is not None) for p, n in parents] == [("usr", True), ("usr/lib", True),
                                                        ("usr/lib/x", False)]


def test_the_spec_puts_it_together(tmp_path: Path) -> None:
    user = ExecUser(1000, 1000, (10,), "/home/alice", "alice")
    spec = runtime.spec({"Cmd": ["id"], "Env": ["A=1"]},
                        RunOptions(network="host", tty=True, console_size=(30, 90)),
                        rootfs=str(tmp_path), user=user, hostname="h", workdir="/w",
                        binds=[], seccomp=None, cgroups_path="/strata/x",
                        cgroup_namespace=False)
    p = spec["process"]
    assert p["args"] == ["id"] and p["cwd"] == "/w" and p["terminal"] is True
    assert p["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [10]}
    assert p["capabilities"]["effective"] == [] and p["consoleSize"] == {"height": 30,
                                                                          "width": 90}
    assert "network" not in {n["type"] for n in spec["linux"]["namespaces"]}
    assert "sysctl" not in spec["linux"] and spec["linux"]["cgroupsPath"] == "/strata/x"
    assert spec["linux"]["maskedPaths"] == list(runtime.MASKED_PATHS)
    assert spec["root"] == {"path": str(tmp_path), "readonly": False}


def test_seccomp_profiles_convert_with_their_conditions() -> None:
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO", "defaultErrnoRet": 38,
        "archMap": [{"architecture": "SCMP_ARCH_X86_64",
                     "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
                    {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": []}],
        "syscalls": [
            {"names": ["read", "write"], "action": "SCMP_ACT_ALLOW"},
            {"names": ["ptrace"], "action": "SCMP_ACT_ALLOW",
             "includes": {"caps": ["CAP_SYS_PTRACE"]}},
            {"names": ["mount"], "action": "SCMP_ACT_ERRNO", "errnoRet": 1,
             "excludes": {"caps": ["CAP_SYS_ADMIN"]}},
            {"names": ["personality"], "action": "SCMP_ACT_ALLOW",
             "args": [{"index": 0, "value": 8, "valueTwo": 0, "op": "SCMP_CMP_EQ"}]},
            {"names": ["future"], "action": "SCMP_ACT_ALLOW",
             "includes": {"minKernel": "99.0"}},
        ]}
    out = runtime_seccomp.oci_profile(profile, ["CAP_CHOWN"])
    names = [r["names"] for r in out["syscalls"]]
    assert names == [["read", "write"], ["mount"], ["personality"]]
    assert out["syscalls"][1]["errnoRet"] == 1
    assert out["syscalls"][2]["args"] == [{"index": 0, "value": 8, "valueTwo": 0,
                                           "op": "SCMP_CMP_EQ"}]
    admin = runtime_seccomp.oci_profile(profile, ["CAP_SYS_ADMIN", "CAP_SYS_PTRACE"])
    assert [r["names"] for r in admin["syscalls"]] == [["read", "write"], ["ptrace"],
                                                       ["personality"]]
    if os.uname().machine == "x86_64":
        assert out["architectures"] == ["SCMP_ARCH_X86_64", "SCMP_ARCH_X86", "SCMP_ARCH_X32"]
    assert runtime_seccomp.load("unconfined", []) is None
    with pytest.raises(RunError, match="cannot read seccomp profile"):
        runtime_seccomp.load("/nonexistent.json", [])


def test_the_init_layer_stubs_what_is_missing_where_the_rootfs_resolves_it(
        tmp_path: Path) -> None:
    from imagestore.containers import Container
    from imagestore.run import _build_init

    layer = MemLayer({"etc": Link("private/etc"), "private/etc/": DIR,
                      "private/etc/hostname": b"image\n", "proc/": DIR, "file": b"x"})
    container = Container("c" * 64, "c", "sha256:x", "i", "", str(tmp_path))
    targets = [("/proc", True), ("/dev", True), ("/etc/hosts", False),
               ("/etc/hostname", False), ("/data/deep", True), ("/file/x", True)]
    _build_init(container, RootView(UnionView([layer])), targets)
    init = tmp_path / "init"
    found = sorted(str(p.relative_to(init)) for p in init.rglob("*"))
    # the symlink /etc is not shadowed: the stub is where it leads; what exists gets none;
    # nothing can go below a file
    assert found == ["data", "data/deep", "dev", "private", "private/etc",
                     "private/etc/hosts"]
    assert (init / "private/etc/hosts").is_file() and (init / "dev").is_dir()
    for d in ("private", "private/etc"):  # the image's attributes: mtime 0, 0755
        st = (init / d).stat()
        assert (st.st_mtime_ns, st.st_mode & 0o7777) == (0, 0o755)
    assert (init / "data").stat().st_mtime_ns != 0  # made here, not in the image
    _build_init(container, RootView(UnionView([layer])), [("/proc", True)])
    assert not init.exists()  # nothing missing: no init layer at all


def test_the_recipe_has_the_init_layer_below_the_upper_in_mounts_only(tmp_path: Path) -> None:
    """``Containers.describe``: a mount of the container (writable: the upper apart; read-only:
    the upper on top) has the init layer right above the image's layers; diff, commit and
    export (``init`` not asked) never see it."""
    import io

    from imagestore import Store
    from imagestore.containers import Containers
    from imagestore.mounting import fuse_missing, plan
    from tests.builders import d, file, tar_bytes

    store = Store(str(tmp_path / "store"))
    image = store.import_rootfs(io.BytesIO(tar_bytes([d("etc"), file("etc/passwd", b"")])))
    c = store.create_container(image)
    cs = Containers(store)
    lowers = store.layers.stack(image.diff_ids)
    upper, init = {"kind": "dir", "path": c.upper}, {"kind": "dir", "path": c.init}
    assert cs.describe(c, init=True) == [upper, *lowers]  # never ran: no init layer
    os.mkdir(c.init)
    assert cs.describe(c, upper=True, init=True) == [upper, init, *lowers]
    assert cs.describe(c, upper=False, init=True) == [init, *lowers]
    assert cs.describe(c) == [upper, *lowers]  # export, commit --squash
    assert cs.describe(c, upper=False) == lowers  # what diff and commit compare the upper with
    if fuse_missing() is None:  # the mount specs (no daemon is started)
        for read_only, want in ((False, [init, *lowers]), (True, [upper, init, *lowers])):
            p = plan(store, c, tmp_path / "mnt", read_only=read_only)
            try:
                assert p.spec["layers"] == want
                assert p.spec["upper"] == (None if read_only else c.upper)
            finally:
                p.close()
