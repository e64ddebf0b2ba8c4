"""The seccomp filter of a run: docker's profile format converted to the OCI spec's.

The default profile is the one podman uses, ``/usr/share/containers/seccomp.json`` (Debian
package ``golang-github-containers-common``), which is docker's default profile in the same
format; ``--security-opt seccomp=PATH`` names another, ``seccomp=unconfined`` turns filtering
off.  ``oci_profile`` applies the profile's conditions as moby's ``setupSeccomp`` does: a rule
whose ``includes`` name capabilities applies only when the container has all of them, one whose
``excludes`` name a capability it has is dropped, likewise for architectures and ``minKernel``;
the architectures are the host's entry of ``archMap``.

Caveats:
* Without the default profile on the machine, a run has no seccomp filter (docker would have
  its built-in one); ``strata run`` then warns once per run.
"""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from typing import Any

from .runtime import RunError

DEFAULT_PROFILES = ("/etc/containers/seccomp.json", "/usr/share/containers/seccomp.json")
# uname -m -> the Go architecture names profiles use, and libseccomp's name
_ARCH = {"x86_64": ("amd64", "SCMP_ARCH_X86_64"), "aarch64": ("arm64", "SCMP_ARCH_AARCH64"),
         "armv7l": ("arm", "SCMP_ARCH_ARM"), "i686": ("x86", "SCMP_ARCH_X86"),
         "ppc64le": ("ppc64le", "SCMP_ARCH_PPC64LE"), "s390x": ("s390x", "SCMP_ARCH_S390X"),
         "riscv64": ("riscv64", "SCMP_ARCH_RISCV64")}


def default_profile_path() -> str | None:
    """The first default profile present, None when there is none."""
    return next((p for p in DEFAULT_PROFILES if os.path.isfile(p)), None)


def load(choice: str | None, caps: Sequence[str]) -> dict[str, Any] | None:
    """The ``linux.seccomp`` object for ``--security-opt seccomp=choice`` (None: the default
    profile) and the container's capabilities; None for ``unconfined`` or when no default
    profile is installed."""
    if choice == "unconfined":
        return None
    path = choice or default_profile_path()
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            profile = json.loads(f.read())
    except OSError as exc:
        raise RunError(f"cannot read seccomp profile {path}: {exc.strerror}") from None
    except ValueError as exc:
        raise RunError(f"seccomp profile {path} is not valid JSON: {exc}") from None
    if not isinstance(profile, dict) or "defaultAction" not in profile:
        raise RunError(f"seccomp profile {path} has no defaultAction")
    return oci_profile(profile, caps)


def _kernel() -> tuple[int, ...]:
    out = []
    for part in platform.release().split("-")[0].split(".")[:2]:
        out.append(int(part) if part.isdigit() else 0)
    return tuple(out)


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(p) if p.isdigit() else 0 for p in text.split(".")[:2])


def oci_profile(profile: dict[str, Any], caps: Sequence[str]) -> dict[str, Any]:
    """Convert a docker-format profile (``defaultAction``, ``archMap``, ``syscalls`` with
    ``includes``/``excludes``) into the OCI ``linux.seccomp`` object."""
    arch, scmp = _ARCH.get(platform.machine(), (platform.machine(), ""))
    out: dict[str, Any] = {"defaultAction": profile["defaultAction"]}
    if "defaultErrnoRet" in profile:
        out["defaultErrnoRet"] = profile["defaultErrnoRet"]
    arches: list[str] = []
    for entry in profile.get("archMap") or []:
        if entry.get("architecture") == scmp:
            arches = [scmp, *(entry.get("subArchitectures") or [])]
    if not arches and profile.get("architectures"):
        arches = list(profile["architectures"])
    if arches:
        out["architectures"] = arches
    kernel = _kernel()
    have = set(caps)
    rules = []
    for call in profile.get("syscalls") or []:
        inc, exc = call.get("includes") or {}, call.get("excludes") or {}
        if inc.get("arches") and arch not in inc["arches"]:
            continue
        if exc.get("arches") and arch in exc["arches"]:
            continue
        if inc.get("caps") and not all(c in have for c in inc["caps"]):
            continue
        if exc.get("caps") and any(c in have for c in exc["caps"]):
            continue
        if inc.get("minKernel") and kernel < _version(inc["minKernel"]):
            continue
        names = list(call.get("names") or ([call["name"]] if call.get("name") else []))
        if not names:
            continue
        rule: dict[str, Any] = {"names": names, "action": call["action"]}
        if call.get("errnoRet") is not None:
            rule["errnoRet"] = call["errnoRet"]
        if call.get("args"):
            rule["args"] = [{k: a[k] for k in ("index", "value", "valueTwo", "op") if k in a}
                            for a in call["args"]]
        rules.append(rule)
    out["syscalls"] = rules
    return out
