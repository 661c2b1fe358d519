"""The web app's users and the API tokens of scripts."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from node.cli.command import Commands, add_command, node_config, node_database, recorded_database
from node.errors import UserError

if TYPE_CHECKING:
    from node.web.accounts import UserSummary


def add_user(commands: Commands) -> None:
    user = add_command(
        commands, "user", cmd_user,
        "web app users: list, add, change a password (read from stdin when not a terminal), disable, enable",
    )
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        return actions.add_parser(name, help=help_text, description=help_text)

    action("list", "every user: role, enabled or disabled, lockout, last login, live sessions and API tokens").add_argument(
        "--json", action="store_true", help="machine-readable output")
    add = action("add", "add a user with a role")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, metavar="ROLE", help="admin, dosimetrist, viewer or physicist")
    action("passwd", "set a new password (also lifts a lockout, ends the user's sessions); a disabled user stays "
                     "disabled").add_argument("name", metavar="NAME")
    action("disable", "no more logins; ends the user's sessions and API tokens").add_argument("name", metavar="NAME")
    action("enable", "a disabled user may log in again (also lifts a lockout); the sessions and API tokens the "
                     "disable ended stay ended").add_argument("name", metavar="NAME")


def cmd_user(args: argparse.Namespace) -> int:
    from node.web import accounts

    # Only `add` may make the database: the others read or change what a node recorded.
    engine = node_database(args) if args.action == "add" else recorded_database(args)
    if args.action == "list":
        users = accounts.list_users(engine, node_config(args).web)
        print(json.dumps([user.to_json() for user in users], indent=2) if args.json else "\n".join(_user_lines(users)))
    elif args.action == "add":
        try:
            role = accounts.Role(args.role)
        except ValueError:
            raise UserError(f"role {args.role!r}: one of {', '.join(accounts.Role)}") from None
        accounts.add_user(engine, args.name, role, _password_input(f"password for {args.name}: "))
        print(f"user {args.name} added with role {role}")
    elif args.action == "passwd":
        if accounts.set_password(engine, args.name, _password_input(f"new password for {args.name}: ")):
            print(f"password of {args.name} changed, sessions ended; user {args.name} is disabled: "
                  f"`rtnode user enable {args.name}` to let them log in")
        else:
            print(f"password of {args.name} changed; lockout lifted, sessions ended")
    elif args.action == "disable":
        accounts.disable_user(engine, args.name)
        print(f"user {args.name} disabled: no more logins; sessions and API tokens ended")
    elif accounts.enable_user(engine, args.name):
        print(f"user {args.name} enabled: may log in again; the sessions and API tokens ended by the disable stay ended")
    else:
        print(f"user {args.name} is enabled already: nothing changed")
    return 0


def _user_lines(users: list[UserSummary]) -> list[str]:
    """`rtnode user list` as a table, times in UTC."""
    if not users:
        return ["no users: `rtnode user add NAME --role admin` makes the first"]
    lines = [f"{'NAME':<20} {'ROLE':<11} {'STATE':<8} {'LOCKED UNTIL UTC':<16} {'LAST LOGIN UTC':<16} SESSIONS TOKENS"]
    for user in users:
        locked = f"{user.locked_until:%Y-%m-%d %H:%M}" if user.locked_until else "-"
        last_login = f"{user.last_login:%Y-%m-%d %H:%M}" if user.last_login else "never"
        state = "enabled" if user.enabled else "disabled"
        lines.append(f"{user.name:<20} {user.role:<11} {state:<8} {locked:<16} {last_login:<16} {user.sessions:>8} "
                     f"{user.api_tokens:>6}")
    return lines


def _password_input(prompt: str) -> str:
    """From a terminal: asked twice, not echoed. Otherwise the first line of standard input (for scripts)."""
    if not sys.stdin.isatty():
        password = sys.stdin.readline().rstrip("\r\n")
        if not password:
            raise UserError("no password on standard input")
        return password
    import getpass

    password = getpass.getpass(prompt)
    if getpass.getpass("again: ") != password:
        raise UserError("the two passwords differ")
    return password


def add_token(commands: Commands) -> None:
    token = add_command(commands, "token", cmd_token, "API tokens for scripts (Authorization: Bearer TOKEN)")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
    actions.add_parser("create", help="print a new API token for the user NAME").add_argument("name", metavar="NAME")


def cmd_token(args: argparse.Namespace) -> int:
    from node.web.accounts import create_api_token

    print(create_api_token(recorded_database(args), args.name))
    return 0
