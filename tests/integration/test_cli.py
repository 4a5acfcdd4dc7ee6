"""The `pagewire export|session` commands and pagewire.tools.rest_client against a real agent.

The CLI runs as a subprocess (`python -m pagewire.tools.cli ...`); workloads are real processes
attaching through pagewire.client.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pagewire.tools.localagents import LocalAgent, free_port
from pagewire.tools.rest_client import ApiError, PagewireClient

MiB = 1 << 20
SIZE = 4 * MiB


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PAGEWIRE_")}
    env.update(extra)
    return env


def cli(
    agent: LocalAgent | None, *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pagewire.tools.cli", *args]
    if agent is not None:
        cmd += ["--url", agent.url]
    return subprocess.run(
        cmd, capture_output=True, text=True, env=env or clean_env(), timeout=timeout
    )


def cli_json(agent: LocalAgent, *args: str) -> Any:
    r = cli(agent, *args, "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def workload(sock: str, *args: str) -> subprocess.Popen[bytes]:
    cmd = [sys.executable, "-m", "pagewire.tools.workload", "--socket", sock, "--size", str(SIZE)]
    return subprocess.Popen([*cmd, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture
def roots(tmp_path: Path) -> Path:
    path = tmp_path / "roots"
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture
def agent(tmp_path: Path, roots: Path) -> Iterator[LocalAgent]:
    a = LocalAgent(tmp_path, "agent", [roots], extra=["--shutdown-grace-s", "2"]).start()
    yield a
    a.stop()


# -- exports


def test_export_lifecycle(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(SIZE)
    made = cli_json(agent, "export", "create", "vm1", str(img))
    assert made["name"] == "vm1" and made["path"] == str(img) and made["size"] == SIZE
    assert made["pages"] == SIZE // made["page_size"] and made["state"] == "ready"
    assert 0 < made["zero_pages"] < made["pages"]

    listed = cli_json(agent, "export", "list")
    assert [e["name"] for e in listed["exports"]] == ["vm1"]
    human = cli(agent, "export", "list")
    assert human.returncode == 0
    header, row = human.stdout.splitlines()
    assert header.split() == ["NAME", "SIZE", "PAGES", "ZERO", "STATE", "PATH"]
    assert row.split()[0] == "vm1" and row.split()[-1] == str(img)

    assert cli_json(agent, "export", "show", "vm1") == made
    shown = cli(agent, "export", "show", "vm1")
    assert shown.returncode == 0 and "zero_pages" in shown.stdout and str(img) in shown.stdout

    again = cli(agent, "export", "create", "vm1", str(img))
    assert again.returncode == 1 and again.stderr.startswith("error: export_exists: ")

    gone = cli(agent, "export", "delete", "vm1")
    assert gone.returncode == 0 and "vm1" in gone.stdout
    missing = cli(agent, "export", "show", "vm1")
    assert missing.returncode == 1
    assert missing.stderr.startswith("error: export_not_found: "), missing.stderr
    assert cli_json(agent, "export", "list") == {"exports": []}
    assert cli(agent, "export", "list").stdout.strip() == "no exports"


def test_export_outside_roots(agent: LocalAgent, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes(bytes(8192))
    r = cli(agent, "export", "create", "x", str(outside))
    assert r.returncode == 1 and r.stderr.startswith("error: outside_export_roots: "), r.stderr


# -- errors and options


def test_unknown_session_exits_1(agent: LocalAgent) -> None:
    for verb in ("show", "cancel", "watch"):
        r = cli(agent, "session", verb, "s-0000000000000000")
        assert r.returncode == 1, (verb, r.stderr)
        assert r.stderr.startswith("error: session_not_found: "), (verb, r.stderr)
        assert r.stdout == ""


def test_session_create_errors(agent: LocalAgent, tmp_path: Path) -> None:
    r = cli(agent, "session", "create", "--path", "/etc/hostname")
    assert r.returncode == 1 and r.stderr.startswith("error: outside_export_roots: "), r.stderr
    r = cli(agent, "session", "create", "--path", str(tmp_path), "--socket-mode", "0667")
    assert r.returncode == 1 and r.stderr.startswith("error: invalid_request: "), r.stderr
    r = cli(agent, "session", "create", "--path", "/x", "--pause-timeout-s", "0")
    assert r.returncode == 1 and r.stderr.startswith("error: out_of_bounds: "), r.stderr


def test_usage_errors_exit_2() -> None:
    cases = [
        ["session", "create"],
        ["session", "create", "--peer", "h:1"],
        ["session", "create", "--node", "n1"],
        ["session", "create", "--path", "/x", "--export", "e"],
        ["session", "create", "--path", "/x", "--peer", "h:1", "--export", "e"],
        ["session", "create", "--path", "/x", "--prefetch", "everything"],
        ["session", "list", "--state", "sleeping"],
        ["session", "list", "--token", "a", "--token-file", "/b"],
        ["export", "create", "only-a-name"],
        ["session", "list", "--token-file", "/nonexistent/token"],
        ["session"],
    ]
    for args in cases:
        r = cli(None, *args)
        assert r.returncode == 2, (args, r.stdout, r.stderr)
        assert "usage:" in r.stderr, (args, r.stderr)


def test_unreachable_agent_exits_1() -> None:
    r = cli(None, "session", "list", "--url", f"http://127.0.0.1:{free_port()}")
    assert r.returncode == 1 and r.stderr.startswith("error: unreachable: "), r.stderr


def test_url_from_environment(agent: LocalAgent) -> None:
    r = cli(None, "session", "list", "--json", env=clean_env(PAGEWIRE_URL=agent.url))
    assert r.returncode == 0 and json.loads(r.stdout) == {"sessions": []}


def test_token(tmp_path: Path, roots: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    token_file.chmod(0o600)
    a = LocalAgent(tmp_path, "secured", [roots], extra=["--token-file", str(token_file)]).start()
    try:
        denied = cli(a, "session", "list")
        assert denied.returncode == 1
        assert denied.stderr.startswith("error: unauthorized: "), denied.stderr
        wrong = cli(a, "export", "list", "--token", "nope")
        assert wrong.returncode == 1 and wrong.stderr.startswith("error: unauthorized: ")

        ok = cli(a, "session", "list", "--json", "--token-file", str(token_file))
        assert ok.returncode == 0, ok.stderr
        assert json.loads(ok.stdout) == {"sessions": []}
        assert cli(a, "export", "list", "--token", "s3cret-token").returncode == 0
        env = clean_env(PAGEWIRE_TOKEN_FILE=str(token_file))
        assert cli(a, "session", "list", env=env).returncode == 0
        env = clean_env(PAGEWIRE_TOKEN="s3cret-token")
        assert cli(a, "export", "list", env=env).returncode == 0

        with PagewireClient(a.url) as api:
            assert api.healthz() is not None  # no token needed
            with pytest.raises(ApiError) as info:
                api.info()
            assert info.value.status == 401 and info.value.code == "unauthorized"
        with PagewireClient(a.url, token="s3cret-token") as api:
            assert api.info()
    finally:
        a.stop()


# -- sessions


def test_session_awaiting_attach_cancel_and_forget(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(SIZE)
    s = cli_json(
        agent,
        "session",
        "create",
        "--path",
        str(img),
        "--prefetch",
        "none",
        "--no-background",
        "--on-source-lost",
        "sigbus",
        "--attach-timeout-s",
        "120",
        "--socket-mode",
        "0660",
    )
    assert s["state"] == "awaiting_attach" and s["source"] == {"path": str(img)}
    assert Path(s["socket"]).exists()
    assert oct(Path(s["socket"]).stat().st_mode & 0o777) == oct(0o660)

    listed = cli_json(agent, "session", "list", "--state", "awaiting_attach")["sessions"]
    assert [x["id"] for x in listed] == [s["id"]]
    assert cli_json(agent, "session", "list", "--state", "completed") == {"sessions": []}
    human = cli(agent, "session", "list")
    assert human.returncode == 0 and s["id"] in human.stdout and "awaiting_attach" in human.stdout
    shown = cli(agent, "session", "show", s["id"])
    assert shown.returncode == 0 and s["socket"] in shown.stdout

    cancelled = cli_json(agent, "session", "cancel", s["id"])
    assert cancelled["id"] == s["id"] and cancelled["state"] == "cancelled"
    assert cancelled["created_at"].endswith("+00:00")  # RFC 3339, UTC
    watch = cli(agent, "session", "watch", s["id"], "--json")
    assert watch.returncode == 1 and json.loads(watch.stdout)["state"] == "cancelled"
    assert "cancelled" in watch.stderr

    human = cli(agent, "session", "list")
    assert "ERROR" in human.stdout.splitlines()[0]
    assert "cancelled: cancelled before attach" in human.stdout  # why it ended
    forgotten = cli(agent, "session", "cancel", s["id"])  # ended: forget it
    assert forgotten.returncode == 0, forgotten.stderr
    assert forgotten.stdout.startswith(f"session {s['id']} forgotten"), forgotten.stdout
    r = cli(agent, "session", "show", s["id"])
    assert r.returncode == 1 and r.stderr.startswith("error: session_not_found: ")


@pytest.mark.usefixtures("require_uffd")
def test_session_watch_until_completed(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(SIZE)
    s = cli_json(agent, "session", "create", "--path", str(img))
    watcher = subprocess.Popen(
        [sys.executable, "-m", "pagewire.tools.cli", "session", "watch", s["id"], "--json"]
        + ["--url", agent.url],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(),
    )
    assert watcher.stderr is not None
    first = watcher.stderr.readline()  # the watch sees the session awaiting attach first
    assert first.startswith("[") and first.rstrip().endswith("awaiting_attach"), first
    proc = workload(s["socket"], "--verify", str(img))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert json.loads(out.decode().splitlines()[-1])["verified"]
    wout, werr = watcher.communicate(timeout=60)
    werr = first + werr
    assert watcher.returncode == 0, werr
    final = json.loads(wout)
    assert final["id"] == s["id"] and final["state"] == "completed"
    assert final["pages_present"] == final["pages_total"] == SIZE // final["page_size"]
    bars = [line for line in werr.splitlines() if line.startswith("[")]
    assert bars[-1].startswith("[" + "#" * 30 + "] 100.0%") and bars[-1].endswith("completed")
    assert "pages" in bars[-1] and "p99" in bars[-1]
    assert cli_json(agent, "session", "show", s["id"]) == final

    human = cli(agent, "session", "watch", s["id"], "--quiet")
    assert human.returncode == 0 and human.stderr == ""
    assert "completed" in human.stdout and "mean_rate" in human.stdout


@pytest.mark.usefixtures("require_uffd")
def test_session_cancel_running(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(SIZE)
    s = cli_json(agent, "session", "create", "--path", str(img), "--no-background")
    proc = workload(s["socket"], "--order", "none", "--hold", "60")
    try:
        with PagewireClient(agent.url) as api:
            deadline = time.monotonic() + 30
            while api.get_session(s["id"])["state"] != "running":
                assert time.monotonic() < deadline
                time.sleep(0.05)
        watcher = subprocess.Popen(
            [sys.executable, "-m", "pagewire.tools.cli", "session", "watch", s["id"]]
            + ["--url", agent.url],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=clean_env(),
        )
        assert watcher.stderr is not None
        first = watcher.stderr.readline()
        assert first.rstrip().endswith("running"), first
        cancelled = cli_json(agent, "session", "cancel", s["id"])
        assert cancelled["state"] == "cancelled", (cancelled, agent.log_tail())
        assert cancelled["pages_present"] < cancelled["pages_total"]
        wout, werr = watcher.communicate(timeout=30)
        assert watcher.returncode == 1, werr
        assert "cancelled" in wout and f"session {s['id']} cancelled" in werr
    finally:
        proc.kill()
        proc.communicate()


# -- the client library itself


@pytest.mark.usefixtures("require_uffd")
def test_client_end_to_end(agent: LocalAgent, image) -> None:  # type: ignore[no-untyped-def]
    img = image(SIZE)
    with PagewireClient(agent.url, timeout=10.0) as api:
        info = api.info()
        assert info["node"] == "agent"
        export = api.create_export("img", str(img))
        assert api.list_exports() == [export] and api.get_export("img") == export
        with pytest.raises(ApiError) as exc:
            api.create_export("img", str(img))
        assert exc.value.status == 409 and exc.value.code == "export_exists"
        with pytest.raises(ApiError) as exc:
            api.create_session({"path": str(img)}, prefetch="sometimes")
        assert exc.value.status == 400
        with pytest.raises(ApiError) as exc:
            api.get_session("s-nope")
        assert (exc.value.status, exc.value.code) == (404, "session_not_found")
        with pytest.raises(ApiError) as exc:
            list(api.events("s-nope"))
        assert (exc.value.status, exc.value.code) == (404, "session_not_found")
        with pytest.raises(ApiError) as exc:
            api.wait("s-nope", timeout=5)
        assert exc.value.code == "session_not_found"

        s = api.create_session({"path": str(img)}, prefetch="around", background=True)
        assert api.list_sessions("awaiting_attach") == [api.get_session(s["id"])]
        stream = api.events(s["id"])
        name, first = next(stream)
        assert name == "progress" and first["state"] == "awaiting_attach"
        proc = workload(s["socket"], "--verify", str(img))
        seen = [(name, first)] + list(stream)
        assert proc.wait(60) == 0
        assert [n for n, _ in seen[:-1]] == ["progress"] * (len(seen) - 1)
        assert seen[-1][0] == "end" and seen[-1][1]["state"] == "completed"
        final = api.wait(s["id"], timeout=30)
        assert final == seen[-1][1] == api.get_session(s["id"])
        assert api.list_sessions("completed") == [final]
        with pytest.raises(TimeoutError):
            api.wait(api.create_session({"path": str(img)})["id"], timeout=0.5)

        assert api.cancel_session(s["id"])["state"] == "completed"  # forgotten
        with pytest.raises(ApiError):
            api.get_session(s["id"])
        assert api.delete_export("img")["name"] == "img"
        assert api.list_exports() == []


# -- the CLI explains itself


def test_version_and_defaults_in_help() -> None:
    from pagewire import __version__

    r = cli(None, "--version")
    assert r.returncode == 0 and r.stdout.strip() == f"pagewire {__version__}"
    agent_help = cli(None, "agent", "--help").stdout
    assert "(default: 127.0.0.1:7070; env PAGEWIRE_HTTP)" in " ".join(agent_help.split())
    demo_help = " ".join(cli(None, "demo", "--help").stdout.split())
    for option in ("--size-mib", "--threads", "--workdir", "--quiet", "--json"):
        assert option in demo_help
    assert "size of the memory image (default: 256)" in demo_help
    create_help = " ".join(cli(None, "session", "create", "--help").stdout.split())
    assert "--compression {none,zstd}" in create_help
    assert "--prefetch {none,around,working_set}" in create_help
    assert "(default: 1.0)" in " ".join(cli(None, "session", "watch", "--help").stdout.split())


def _options(help_text: str) -> list[tuple[str, str]]:
    """(option, its help) for each option of an argparse --help."""
    import re

    body = help_text.split("options:", 1)[1]
    entries = re.split(r"\n  (?=-)", "\n" + body)
    return [(e.split()[0].rstrip(","), " ".join(e.split()[1:])) for e in entries if e.strip()]


@pytest.mark.parametrize(
    "command",
    [
        ["agent"],
        ["demo"],
        ["export", "create"],
        ["session", "create"],
        ["session", "list"],
        ["session", "watch"],
    ],
)
def test_every_option_is_described(command: list[str]) -> None:
    text = cli(None, *command, "--help").stdout
    for option, help_text in _options(text):
        words = [w for w in help_text.split() if not w.isupper() and not w.startswith("{")]
        assert words, f"{' '.join(command)} {option} has no description"


def test_every_setting_has_a_flag() -> None:
    from pagewire.agent.settings import Settings
    from pagewire.tools.cli import setting_flags

    text = " ".join(cli(None, "agent", "--help").stdout.split())
    for name, field in Settings.model_fields.items():
        flag = setting_flags(name, field)[0][0]
        assert flag in text, name
        assert f"PAGEWIRE_{name.upper()})" in text, name
        assert field.description, f"setting {name} has no description"


def test_old_flag_spellings_still_work(tmp_path: Path) -> None:
    from pagewire.tools.cli import agent_settings, build_parser

    roots = tmp_path / "r"
    roots.mkdir()
    args = build_parser().parse_args(
        [
            "agent",
            "--export-root",
            str(roots),
            "--allowed-uid",
            "5",
            "--allowed-uid",
            "6",
            "--no-native-channel",
            "--insecure-peers",
            "--log-json",
            "--max-sessions",
            "3",
            "--shutdown-policy",
            "handover",
            "--state-dir",
            str(tmp_path),
        ]
    )
    s: Any = agent_settings(args)
    assert s.export_roots == [roots] and s.allowed_uids == [5, 6] and s.native_channel is False
    assert s.insecure_peers and s.log_json and s.max_sessions == 3
    assert s.shutdown_policy == "handover"


def test_bad_settings_stop_the_agent_naming_the_flag(tmp_path: Path) -> None:
    r = cli(None, "agent", "--export-root", str(tmp_path / "nonexistent"), timeout=30)
    assert r.returncode == 2 and "is not a directory" in r.stderr, r.stderr
    r = cli(None, "agent", "--chunk-size", "5000", timeout=30)
    assert r.returncode == 2 and "--chunk-size (PAGEWIRE_CHUNK_SIZE)" in r.stderr, r.stderr
    r = cli(None, "agent", env=clean_env(PAGEWIRE_MAX_SESSIONS="0"), timeout=30)
    assert r.returncode == 2 and "--max-sessions (PAGEWIRE_MAX_SESSIONS)" in r.stderr, r.stderr


def test_session_create_compression_and_prefetch(agent: LocalAgent) -> None:
    nobody = f"127.0.0.1:{free_port()}"
    r = cli(
        agent, "session", "create", "--peer", nobody, "--export", "x",
        "--compression", "zstd", "--prefetch", "working_set", "--json",
    )  # fmt: skip
    # no agent there: the request passed validation with both options and reached the peer
    assert r.returncode == 1 and r.stderr.startswith("error: peer_unreachable"), r.stderr
    r = cli(agent, "session", "create", "--peer", nobody, "--export", "x", "--compression", "lz4")
    assert r.returncode == 2 and "invalid choice" in r.stderr
