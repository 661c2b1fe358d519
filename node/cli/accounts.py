"""The web app's users and the API tokens of scripts."""

from __future__ import annotations

import argparse
import sys

from node.cli.command import Commands, add_command, node_database
from node.errors import UserError


def add_user(commands: Commands) -> None:
    user = add_command(
        commands, "user", cmd_user, "web app users: add, disable, change a password (read from stdin when not a terminal)"
    )
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="add a user with a role")
    add.add_argument("name", metavar="NAME")
    add.add_argument("--role", required=True, metavar="ROLE", help="admin, dosimetrist or viewer")
    disable = actions.add_parser("disable", help="no more logins; ends the user's sessions and API tokens")
    disable.add_argument("name", metavar="NAME")
    passwd = actions.add_parser("passwd", help="set a new password (also lifts a lockout)")
    passwd.add_argument("name", metavar="NAME")


def cmd_user(args: argparse.Namespace) -> int:
    from node.web import accounts

    engine = node_database(args)
    if args.action == "add":
        try:
            role = accounts.Role(args.role)
        except ValueError:
            raise UserError(f"role {args.role!r}: one of {', '.join(accounts.Role)}") from None
        accounts.add_user(engine, args.name, role, _password_input(f"password for {args.name}: "))
        print(f"user {args.name} added with role {role}")
    elif args.action == "disable":
        accounts.disable_user(engine, args.name)
        print(f"user {args.name} disabled: no more logins; sessions and API tokens ended")
    else:
        accounts.set_password(engine, args.name, _password_input(f"new password for {args.name}: "))
        print(f"password of {args.name} changed; lockout lifted, sessions ended")
    return 0


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

    print(create_api_token(node_database(args), args.name))
    return 0
