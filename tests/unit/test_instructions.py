"""--change instructions, as docker import/commit apply them."""

from __future__ import annotations

import pytest

from imagestore.instructions import InvalidChange, apply_changes


def test_exec_and_shell_forms() -> None:
    cfg = apply_changes({}, ['CMD ["echo", "hi"]', "ENTRYPOINT /bin/run --flag"])
    assert cfg["Cmd"] == ["echo", "hi"]
    assert cfg["Entrypoint"] == ["/bin/sh", "-c", "/bin/run --flag"]
    assert apply_changes({}, ["CMD [broken json"])["Cmd"] == ["/bin/sh", "-c", "[broken json"]


def test_entrypoint_clears_inherited_cmd() -> None:
    assert apply_changes({"Cmd": ["sh"]}, ['ENTRYPOINT ["x"]'])["Cmd"] is None
    cfg = apply_changes({"Cmd": ["sh"]}, ['CMD ["y"]', 'ENTRYPOINT ["x"]'])
    assert cfg["Cmd"] == ["y"]


def test_env_label_expose_volume_and_friends() -> None:
    cfg = apply_changes({"Env": ["PATH=/bin", "A=old"]}, [
        'ENV A=new B="two words" C=${A}-x',
        "ENV LEGACY value with spaces",
        'LABEL "com.example.v"=1 x=\'$A\'',
        "EXPOSE 80 53/udp 8000-8002",
        'VOLUME ["/data", "/logs"]',
        "VOLUME /more",
        "USER 1000:1000",
        "WORKDIR /app",
        "WORKDIR sub",
        "STOPSIGNAL SIGKILL",
        "ONBUILD RUN make",
        "HEALTHCHECK --interval=5s --retries=3 CMD curl -f http://localhost/",
    ])
    # variables expand with the Env from before the instruction (Dockerfile rule)
    assert cfg["Env"] == ["PATH=/bin", "A=new", "B=two words", "C=old-x",
                          "LEGACY=value with spaces"]
    assert cfg["Labels"] == {"com.example.v": "1", "x": "$A"}
    assert set(cfg["ExposedPorts"]) == {"80/tcp", "53/udp", "8000/tcp", "8001/tcp", "8002/tcp"}
    assert set(cfg["Volumes"]) == {"/data", "/logs", "/more"}
    assert cfg["User"] == "1000:1000"
    assert cfg["WorkingDir"] == "/app/sub"
    assert cfg["StopSignal"] == "SIGKILL"
    assert cfg["OnBuild"] == ["RUN make"]
    assert cfg["Healthcheck"] == {"Test": ["CMD-SHELL", "curl -f http://localhost/"],
                                  "Interval": 5_000_000_000, "Retries": 3}


def test_input_is_not_modified() -> None:
    base = {"Env": ["A=1"]}
    apply_changes(base, ["ENV A=2"])
    assert base == {"Env": ["A=1"]}


@pytest.mark.parametrize("change, message", [
    ("RUN make", "run is not a valid change command"),
    ("COPY a b", "copy is not a valid change command"),
    ("ADD a b", "add is not a valid change command"),
    ("FROM scratch", "from is not a valid change command"),
    ("BOGUS x", "unknown instruction"),
    ("EXPOSE 99999", "invalid port"),
    ("STOPSIGNAL NOTASIGNAL", "invalid STOPSIGNAL"),
    ("ENV A='unterminated", "unterminated"),
    ("HEALTHCHECK --interval=soon CMD x", "invalid duration"),
    ("ONBUILD FROM x", "isn't allowed"),
    ("LABEL novalue", "KEY=VALUE"),
])
def test_refused(change: str, message: str) -> None:
    with pytest.raises(InvalidChange, match=message):
        apply_changes({}, [change])
