"""The `pagewire` command: agent, demo, and the API client commands."""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import ValidationError
from pydantic.fields import FieldInfo

from pagewire import __version__
from pagewire.tools.cli_api import HelpFormatter, add_api_commands

# Flag spellings that differ from the setting's name (kept so old command lines work).
FLAG_NAMES = {
    "export_roots": "--export-root",
    "allowed_uids": "--allowed-uid",
    "live_export_uids": "--live-export-uid",
}
DEFAULT_TEXT = {"node_name": "this host's name", "advertise_grpc": "the --grpc address"}


def _unwrap(annotation: Any) -> Any:
    """list[int] | None -> list[int]; Annotated[X, ...] -> X."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return _unwrap(args[0])
    return annotation


def _default_text(name: str, field: FieldInfo) -> str:
    if name in DEFAULT_TEXT:
        return DEFAULT_TEXT[name]
    if field.default_factory is not None:
        value = field.default_factory()  # type: ignore[call-arg]
    else:
        value = field.default
    if value is None or value == []:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    return str(value)


def setting_flags(name: str, field: FieldInfo) -> tuple[list[str], dict[str, Any]]:
    """The argparse flag(s) and options of one Settings field: its description is the help,
    its default and environment twin are shown, its type and choices are checked."""
    flag = FLAG_NAMES.get(name, "--" + name.replace("_", "-"))
    kind = _unwrap(field.annotation)
    description = " ".join((field.description or "").split())
    env = "PAGEWIRE_" + name.upper()
    opts: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS}
    if kind is bool:
        opts["action"] = argparse.BooleanOptionalAction
    elif typing.get_origin(kind) is list:
        (item,) = typing.get_args(kind)
        opts.update(action="append", type=_unwrap(item), metavar=name[:-1].upper())
    elif typing.get_origin(kind) is typing.Literal:
        opts["choices"] = list(typing.get_args(kind))
    else:
        opts["type"] = kind if kind in (int, float) else str
        opts["metavar"] = name.upper()
    opts["help"] = f"{description} (default: {_default_text(name, field)}; env {env})".replace(
        "%", "%%"
    )
    return [flag], opts


def add_agent_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, so a setting can never lack its flag."""
    from pagewire.agent.settings import Settings

    for name, field in Settings.model_fields.items():
        flags, opts = setting_flags(name, field)
        parser.add_argument(*flags, **opts)


def agent_settings(args: argparse.Namespace) -> object:
    from pagewire.agent.settings import Settings

    given = {name: getattr(args, name) for name in Settings.model_fields if hasattr(args, name)}
    return Settings(**given)


def describe_setting_error(err: Any) -> str:
    """A settings error named by the flag the user wrote (`--chunk-size: ...`)."""
    from pagewire.agent.settings import Settings

    name = str(err["loc"][0]) if err["loc"] else ""
    message = str(err["msg"]).removeprefix("Value error, ")
    if name in Settings.model_fields:
        flag = setting_flags(name, Settings.model_fields[name])[0][0]
        return f"{flag} (PAGEWIRE_{name.upper()}): {message}"
    return message


def cmd_agent(args: argparse.Namespace) -> int:
    from pagewire.agent import logs
    from pagewire.agent import run as agent

    try:
        settings = agent_settings(args)
    except ValidationError as exc:
        for err in exc.errors():
            print(f"pagewire agent: {describe_setting_error(err)}", file=sys.stderr)
        return 2
    logs.configure(
        settings.log_json,  # type: ignore[attr-defined]
        settings.log_level,  # type: ignore[attr-defined]
        repeat_limit=settings.log_repeat_limit,  # type: ignore[attr-defined]
    )
    try:
        agent.run(settings)  # type: ignore[arg-type]
    except OSError as exc:  # a port that is taken, as uvicorn does for the HTTP port
        print(f"pagewire agent: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from pagewire.tools.demo import run_demo

    return run_demo(
        size_mib=args.size_mib,
        threads=args.threads,
        workdir=args.workdir,
        quiet=args.quiet,
        json_report=args.json,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagewire", description=__doc__, formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"pagewire {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    agent = sub.add_parser(
        "agent",
        help="run the per-host agent",
        description="Run the per-host agent. Every flag has a PAGEWIRE_* environment twin; "
        "a flag wins over its twin. Bad settings stop the agent with a message (exit 2).",
        formatter_class=HelpFormatter,
    )
    add_agent_flags(agent)
    agent.set_defaults(func=cmd_agent)
    demo = sub.add_parser(
        "demo",
        help="two agents, a generated image, a post-copy restore",
        description="Start two agents on this machine, publish a generated memory image on "
        "one, restore it post-copy into a workload process on the other, and report.",
        formatter_class=HelpFormatter,
    )
    demo.add_argument("--size-mib", type=int, default=256, help="size of the memory image")
    demo.add_argument("--threads", type=int, default=2, help="workload threads touching pages")
    demo.add_argument(
        "--workdir",
        type=Path,
        default=None,
        help="directory for the image, sockets and agent state (kept); default: a temporary "
        "directory, removed at the end",
    )
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.add_argument("--json", action="store_true", help="print the report as JSON")
    demo.set_defaults(func=cmd_demo)
    add_api_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
