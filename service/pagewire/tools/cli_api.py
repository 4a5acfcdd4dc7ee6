"""CLI commands that talk to an agent's REST API: `pagewire export ...`, `pagewire session ...`.

Every command takes --url (PAGEWIRE_URL, default http://127.0.0.1:7070), --token or
--token-file (PAGEWIRE_TOKEN, PAGEWIRE_TOKEN_FILE) and --json (print the API's JSON as is).
API errors print `error: <code>: <message>` on stderr and exit 1; usage errors exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pagewire.agent.settings import read_token
from pagewire.control.models import ACTIVE_STATES
from pagewire.exports.errors import NAME_RULE
from pagewire.tools.cli_format import (
    emit_json,
    export_fields,
    fmt_error,
    fmt_size,
    fmt_source,
    mean_rate,
    output,
    session_fields,
    table,
)
from pagewire.tools.progress import RateMeter, fmt_rate, fmt_seconds, render
from pagewire.tools.rest_client import DEFAULT_URL, ApiError, PagewireClient

Handler = Callable[[PagewireClient, argparse.Namespace], int]
MiB = 1 << 20


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default; options without one (None, False) say nothing more."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


class UsageError(Exception):
    """A bad combination of options: reported like argparse's own errors (exit 2)."""


# -- options and the client


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("agent connection")
    g.add_argument("--url", help=f"the agent's REST API (PAGEWIRE_URL, default {DEFAULT_URL})")
    g.add_argument("--token", help="bearer token (PAGEWIRE_TOKEN)")
    g.add_argument(
        "--token-file", metavar="PATH", help="file holding the bearer token (PAGEWIRE_TOKEN_FILE)"
    )
    g.add_argument("--json", action="store_true", help="print the API's JSON (for scripts)")
    return common


def resolve_url(args: argparse.Namespace) -> str:
    return str(args.url or os.environ.get("PAGEWIRE_URL") or DEFAULT_URL)


def resolve_token(args: argparse.Namespace) -> str | None:
    """--token, then --token-file, then PAGEWIRE_TOKEN, then PAGEWIRE_TOKEN_FILE."""
    if args.token and args.token_file:
        raise UsageError("give --token or --token-file, not both")
    if args.token:
        return str(args.token)
    path = args.token_file
    if not path:
        env = os.environ.get("PAGEWIRE_TOKEN")
        if env:
            return env.strip()
        path = os.environ.get("PAGEWIRE_TOKEN_FILE")
    if not path:
        return None
    try:
        return read_token(Path(path))
    except ValueError as exc:  # the agent's own rules for the file
        raise UsageError(str(exc)) from None


def _command(parser: argparse.ArgumentParser, handler: Handler) -> Callable[..., int]:
    def run(args: argparse.Namespace) -> int:
        try:
            client = PagewireClient(resolve_url(args), token=resolve_token(args))
            with client:
                return handler(client, args)
        except UsageError as exc:
            parser.error(str(exc))
        except ApiError as exc:
            print(f"error: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(file=sys.stderr)
            return 130

    return run


# -- export commands


def export_create(api: PagewireClient, args: argparse.Namespace) -> int:
    body = api.create_export(args.name, os.path.abspath(args.path))
    output(args, body, export_fields)
    return 0


def export_list(api: PagewireClient, args: argparse.Namespace) -> int:
    items = api.list_exports()
    if args.json:
        emit_json({"exports": items})
        return 0
    if not items:
        print("no exports")
        return 0
    rows = [
        [
            str(e.get("name")),
            fmt_size(int(e.get("size", 0))),
            str(e.get("pages")),
            str(e.get("zero_pages")),
            str(e.get("state")),
            str(e.get("path")),
        ]
        for e in items
    ]
    print(table(["NAME", "SIZE", "PAGES", "ZERO", "STATE", "PATH"], rows))
    return 0


def export_show(api: PagewireClient, args: argparse.Namespace) -> int:
    body = api.get_export(args.name)
    output(args, body, export_fields)
    return 0


def export_delete(api: PagewireClient, args: argparse.Namespace) -> int:
    body = api.delete_export(args.name)
    output(args, body, lambda b: f"withdrew export {b.get('name', args.name)}")
    return 0


# -- session commands


def session_source(args: argparse.Namespace) -> dict[str, Any]:
    if args.path is not None:
        if args.export is not None:
            raise UsageError("--export goes with --peer or --node, not with --path")
        return {"path": os.path.abspath(args.path)}
    if args.export is None:
        raise UsageError(f"--{'peer' if args.peer is not None else 'node'} needs --export NAME")
    if args.peer is not None:
        return {"peer": args.peer, "export": args.export}
    return {"node": args.node, "export": args.export}


def session_create(api: PagewireClient, args: argparse.Namespace) -> int:
    source = session_source(args)
    sock = {
        k: v
        for k, v in (("uid", args.socket_uid), ("gid", args.socket_gid), ("mode", args.socket_mode))
        if v is not None
    }
    body = api.create_session(
        source,
        prefetch=args.prefetch,
        compression=args.compression,
        background=args.background,
        on_source_lost=args.on_source_lost,
        pause_timeout_s=args.pause_timeout_s,
        attach_timeout_s=args.attach_timeout_s,
        socket=sock or None,
    )
    output(args, body, session_fields)
    return 0


def session_list(api: PagewireClient, args: argparse.Namespace) -> int:
    items = api.list_sessions(args.state)
    if args.json:
        emit_json({"sessions": items})
        return 0
    if not items:
        print("no sessions")
        return 0
    rows = []
    for s in items:
        faults = s.get("faults") or {}
        lat = s.get("fault_latency_seconds") or {}
        rows.append(
            [
                str(s.get("id")),
                str(s.get("state")),
                "-"
                if s.get("state") == "awaiting_attach"
                else f"{s.get('pages_present')}/{s.get('pages_total')}",
                str(sum(int(v or 0) for v in faults.values())),
                fmt_seconds(lat.get("p99")),
                fmt_source(s.get("source") or {}),
                fmt_error(s.get("error")),
            ]
        )
    print(table(["ID", "STATE", "PAGES", "FAULTS", "P99", "SOURCE", "ERROR"], rows))
    return 0


def session_show(api: PagewireClient, args: argparse.Namespace) -> int:
    body = api.get_session(args.id)
    output(args, body, session_fields)
    return 0


def session_cancel(api: PagewireClient, args: argparse.Namespace) -> int:
    """Cancels a running session; an ended one is forgotten (its record dropped)."""
    was_active = api.get_session(args.id).get("state") in ACTIVE_STATES
    body = api.cancel_session(args.id)
    verb = "cancelled" if was_active else "forgotten (it had ended; its record is dropped)"
    output(args, body, lambda b: f"session {b.get('id')} {verb}\n" + session_fields(b))
    return 0


def session_watch(api: PagewireClient, args: argparse.Namespace) -> int:
    """A live bar on stderr until the session ends; the final status on stdout; exit 0 only
    if it completed."""
    tty = sys.stderr.isatty()
    meter = RateMeter()
    final: dict[str, Any] | None = None
    shown = False
    for name, status in api.watch(args.id, poll_interval=args.interval):
        rate = meter.update(status)
        if name == "end":
            final = status
            rate = mean_rate(status) or rate  # the whole restore, not the last interval
        if not args.quiet:
            line = render(status, rate)
            sys.stderr.write(f"\r{line}\x1b[K" if tty else line + "\n")
            sys.stderr.flush()
            shown = True
    if shown and tty:
        sys.stderr.write("\n")
    assert final is not None
    output(args, final, lambda b: session_fields(b, [("mean_rate", fmt_rate(mean_rate(b)))]))
    if final.get("state") != "completed":
        err = final.get("error") or {}
        detail = f": {err.get('code')}: {err.get('message')}" if err else ""
        print(f"session {final.get('id')} {final.get('state')}{detail}", file=sys.stderr)
        return 1
    return 0


# -- the parsers


def add_api_commands(sub: Any) -> None:
    """Add `export` and `session` to the `pagewire` command's subparsers."""
    common = _common_options()

    def leaf(group: Any, name: str, handler: Handler, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = group.add_parser(
            name,
            parents=[common],
            help=help_text,
            description=help_text,
            formatter_class=HelpFormatter,
        )
        p.set_defaults(func=_command(p, handler))
        return p

    export = sub.add_parser(
        "export",
        help="publish files for peers: create, list, show, delete",
        description="Publish files for peers: create, list, show, delete.",
    )
    ex = export.add_subparsers(dest="export_command", required=True, metavar="COMMAND")
    name_help = f"the export's name: {NAME_RULE}"
    p = leaf(ex, "create", export_create, "publish a file under an export root")
    p.add_argument("name", help=name_help)
    p.add_argument("path", help="the file, under one of the agent's export roots")
    leaf(ex, "list", export_list, "list exports")
    p = leaf(ex, "show", export_show, "show one export")
    p.add_argument("name", help="the export's name")
    p = leaf(ex, "delete", export_delete, "withdraw an export")
    p.add_argument("name", help="the export's name")

    session = sub.add_parser(
        "session", help="post-copy sessions: create, list, show, cancel, watch"
    )
    ss = session.add_subparsers(dest="session_command", required=True, metavar="COMMAND")
    p = leaf(ss, "create", session_create, "create a post-copy session")
    src = p.add_argument_group("source (one of)")
    one = src.add_mutually_exclusive_group(required=True)
    one.add_argument("--path", help="a local image under an export root")
    one.add_argument("--peer", metavar="HOST:PORT", help="a peer agent's gRPC address")
    one.add_argument("--node", help="a peer agent's node name")
    src.add_argument("--export", metavar="NAME", help="the export, with --peer or --node")
    p.add_argument(
        "--prefetch",
        choices=["none", "around", "working_set"],
        help="what a fault brings in besides its page: nothing, the aligned window around "
        "it, or the pages the source recorded as the working set (agent default: around)",
    )
    p.add_argument(
        "--compression",
        choices=["none", "zstd"],
        help="compress page data on the wire from a peer (agent default: none)",
    )
    p.add_argument(
        "--no-background",
        dest="background",
        action="store_const",
        const=False,
        default=None,
        help="no background fill: only faulted (and prefetched) pages",
    )
    p.add_argument(
        "--on-source-lost",
        choices=["wait", "sigbus"],
        help="when the source goes away: pause and wait, or SIGBUS (agent default: wait)",
    )
    p.add_argument(
        "--pause-timeout-s",
        type=float,
        metavar="S",
        help="seconds a session paused for a lost source waits before --on-source-lost "
        "applies (agent default: 30)",
    )
    p.add_argument(
        "--attach-timeout-s",
        type=float,
        metavar="S",
        help="seconds the workload has to connect and hand over (agent default: 60)",
    )
    p.add_argument("--socket-uid", type=int, metavar="UID", help="owner of the session socket")
    p.add_argument("--socket-gid", type=int, metavar="GID", help="group of the session socket")
    p.add_argument("--socket-mode", metavar="MODE", help="octal, e.g. 0660 (agent default 0600)")
    p = leaf(ss, "list", session_list, "list sessions (ERROR says why one failed)")
    p.add_argument(
        "--state",
        choices=["awaiting_attach", "running", "paused", "completed", "failed", "cancelled"],
        help="only sessions in this state",
    )
    p = leaf(ss, "show", session_show, "show one session's status")
    p.add_argument("id", help="the session id (s-...)")
    p = leaf(ss, "cancel", session_cancel, "cancel a running session or forget an ended one")
    p.add_argument("id", help="the session id (s-...)")
    p = leaf(
        ss,
        "watch",
        session_watch,
        "a live progress bar until the session ends; exit 0 if it completed, 1 otherwise",
    )
    p.add_argument("id", help="the session id (s-...)")
    p.add_argument("--quiet", action="store_true", help="no progress bar, only the final status")
    p.add_argument(
        "--interval",
        type=float,
        default=1.0,
        metavar="S",
        help="seconds between polls when the agent has no event stream",
    )


__all__ = ["HelpFormatter", "UsageError", "add_api_commands", "resolve_token", "resolve_url"]
