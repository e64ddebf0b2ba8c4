"""References normalise as docker's do."""

from __future__ import annotations

import pytest

from imagestore.errors import InvalidReference
from imagestore.reference import parse, parse_repo_tag

D = "sha256:" + "a" * 64


@pytest.mark.parametrize("raw, full, familiar", [
    ("busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("busybox:1.36", "docker.io/library/busybox:1.36", "busybox:1.36"),
    ("library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("docker.io/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("index.docker.io/library/busybox", "docker.io/library/busybox:latest", "busybox:latest"),
    ("user/app:v1", "docker.io/user/app:v1", "user/app:v1"),
    ("localhost/app", "localhost/app:latest", "localhost/app:latest"),
    ("localhost:5000/a/b:t", "localhost:5000/a/b:t", "localhost:5000/a/b:t"),
    ("127.0.0.1:5000/x", "127.0.0.1:5000/x:latest", "127.0.0.1:5000/x:latest"),
    ("quay.io/org/img", "quay.io/org/img:latest", "quay.io/org/img:latest"),
    (f"busybox@{D}", f"docker.io/library/busybox@{D}", f"busybox@{D}"),
    (f"busybox:1@{D}", f"docker.io/library/busybox:1@{D}", f"busybox:1@{D}"),
    ("a-b__c/e.f", "docker.io/a-b__c/e.f:latest", "a-b__c/e.f:latest"),
])
def test_normalisation(raw: str, full: str, familiar: str) -> None:
    ref = parse(raw)
    assert str(ref) == full
    assert ref.familiar == familiar


@pytest.mark.parametrize("raw", [
    "", "Busybox", "busybox:", "bad tag:x y", "a//b", "-a", "a:" + "t" * 200,
    "a@sha256:short", "a@md5:" + "0" * 32, "a" * 64, " busybox", "x/:t",
])
def test_invalid(raw: str) -> None:
    with pytest.raises(InvalidReference):
        parse(raw)


def test_digest_is_not_a_tag_destination() -> None:
    with pytest.raises(InvalidReference, match="digest"):
        parse_repo_tag(f"busybox@{D}")


def test_registry_host() -> None:
    assert parse("busybox").api_host == "registry-1.docker.io"
    assert parse("localhost:5000/x").api_host == "localhost:5000"
