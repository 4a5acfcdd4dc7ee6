"""The `pagewire` command: agent, demo, and the API client commands."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pydantic import ValidationError

AGENT_FLAGS: list[tuple[str, dict[str, object]]] = [
    ("--http", {"help": "HOST:PORT of the REST API (PAGEWIRE_HTTP)"}),
    ("--grpc", {"help": "HOST:PORT of the peer gRPC service (PAGEWIRE_GRPC)"}),
    ("--advertise-grpc", {"help": "gRPC address peers should use (PAGEWIRE_ADVERTISE_GRPC)"}),
    ("--socket-dir", {"help": "directory of session sockets (PAGEWIRE_SOCKET_DIR)"}),
    ("--state-dir", {"help": "directory of export and session records (PAGEWIRE_STATE_DIR)"}),
    (
        "--export-root",
        {
            "action": "append",
            "dest": "export_roots",
            "help": "directory exports and local sources must lie under; repeatable "
            "(PAGEWIRE_EXPORT_ROOTS, colon-separated)",
        },
    ),
    ("--token-file", {"help": "file holding the REST bearer token (PAGEWIRE_TOKEN_FILE)"}),
    ("--tls-cert", {"help": "PEM certificate for peer mTLS (PAGEWIRE_TLS_CERT)"}),
    ("--tls-key", {"help": "PEM key for peer mTLS (PAGEWIRE_TLS_KEY)"}),
    ("--tls-ca", {"help": "PEM CA bundle peers are checked against (PAGEWIRE_TLS_CA)"}),
    (
        "--insecure-peers",
        {
            "action": "store_const",
            "const": True,
            "help": "allow plain-text gRPC off loopback (PAGEWIRE_INSECURE_PEERS)",
        },
    ),
    ("--node-name", {"help": "this node's name (PAGEWIRE_NODE_NAME)"}),
    (
        "--peer-dns-pattern",
        {
            "help": "how a node name becomes a gRPC address, e.g. "
            "'{node}.pagewire.pagewire.svc:7071' (PAGEWIRE_PEER_DNS_PATTERN)"
        },
    ),
    ("--max-sessions", {"type": int, "help": "concurrent sessions (PAGEWIRE_MAX_SESSIONS)"}),
    (
        "--max-bytes-in-flight",
        {"type": int, "help": "bytes fetched but not installed (PAGEWIRE_MAX_BYTES_IN_FLIGHT)"},
    ),
    ("--chunk-size", {"type": int, "help": "chunk size of new exports (PAGEWIRE_CHUNK_SIZE)"}),
    (
        "--shutdown-grace-s",
        {
            "type": float,
            "help": "seconds running sessions get on SIGTERM (PAGEWIRE_SHUTDOWN_GRACE_S)",
        },
    ),
    (
        "--no-native-channel",
        {
            "action": "store_const",
            "const": False,
            "dest": "native_channel",
            "help": "carry page data over gRPC only (PAGEWIRE_NATIVE_CHANNEL=false)",
        },
    ),
    (
        "--cache-bytes",
        {
            "type": int,
            "help": "per-host chunk cache shared by sessions, 0 to turn it off "
            "(PAGEWIRE_CACHE_BYTES, default 256 MiB)",
        },
    ),
    (
        "--data-port",
        {
            "type": int,
            "help": "TCP port of the native data channel (PAGEWIRE_DATA_PORT, default 7072, "
            "0 for any); peers dial it on the host they dialled for gRPC",
        },
    ),
    (
        "--shutdown-policy",
        {
            "choices": ["fail", "handover"],
            "help": "after the grace period: fail what is left (SIGBUS) or leave it registered "
            "for the next agent to take back (PAGEWIRE_SHUTDOWN_POLICY)",
        },
    ),
    (
        "--socket-group",
        {
            "type": int,
            "help": "gid allowed to enter the socket dir, then 0710 (PAGEWIRE_SOCKET_GROUP)",
        },
    ),
    (
        "--allowed-uid",
        {
            "action": "append",
            "type": int,
            "dest": "allowed_uids",
            "help": "uid allowed to hand over a uffd (SO_PEERCRED); repeatable "
            "(PAGEWIRE_ALLOWED_UIDS)",
        },
    ),
    (
        "--retention-s",
        {"type": float, "help": "seconds ended sessions are kept (PAGEWIRE_RETENTION_S)"},
    ),
    (
        "--log-json",
        {"action": "store_const", "const": True, "help": "JSON logs (PAGEWIRE_LOG_JSON)"},
    ),
    ("--log-level", {"help": "debug, info, warning (PAGEWIRE_LOG_LEVEL)"}),
]


def agent_settings(args: argparse.Namespace) -> object:
    from .settings import Settings

    given = {}
    for flag, opts in AGENT_FLAGS:
        dest = str(opts.get("dest", flag[2:].replace("-", "_")))
        value = getattr(args, dest, None)
        if value is not None:
            given[dest] = value
    return Settings(**given)


def cmd_agent(args: argparse.Namespace) -> int:
    from . import agent, logs

    try:
        settings = agent_settings(args)
    except ValidationError as exc:
        for err in exc.errors():
            where = ".".join(str(p) for p in err["loc"]) or "settings"
            print(f"pagewire agent: {where}: {err['msg']}", file=sys.stderr)
        return 2
    logs.configure(settings.log_json, settings.log_level)  # type: ignore[attr-defined]
    agent.run(settings)  # type: ignore[arg-type]
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(
        size_mib=args.size_mib,
        threads=args.threads,
        workdir=args.workdir,
        quiet=args.quiet,
        json_report=args.json,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagewire", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    agent = sub.add_parser("agent", help="run the per-host agent")
    for flag, opts in AGENT_FLAGS:
        agent.add_argument(flag, **opts)  # type: ignore[arg-type]
    agent.set_defaults(func=cmd_agent)
    demo = sub.add_parser("demo", help="two agents, a generated image, a post-copy restore")
    demo.add_argument("--size-mib", type=int, default=256)
    demo.add_argument("--threads", type=int, default=2)
    demo.add_argument("--workdir", type=Path, default=None)
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=cmd_demo)
    from .cli_api import add_api_commands

    add_api_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
