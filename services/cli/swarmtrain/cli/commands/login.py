"""``swarmtrain login``: sign in to a gateway (or sign up first) and store the token (0600)."""

from __future__ import annotations

import argparse
import getpass
import sys

from swarmtrain.cli.client import DEFAULT_API, ApiError, Client, Login, load_login, save_login
from swarmtrain.cli.commands.base import Group
from swarmtrain.cli.output import one_line_errors


def register(sub: Group) -> None:
    p = sub.add_parser("login", help="sign in to a swarmtrain gateway and store the token (0600)")
    p.add_argument("--api", help=f"the gateway's URL (default: the stored one, else {DEFAULT_API})")
    p.add_argument("--email", help="the account's email (default: asked)")
    p.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    p.add_argument("--token-stdin", action="store_true", help="read an access token from stdin (for scripts)")
    p.add_argument("--signup", action="store_true", help="create the account first")
    p.set_defaults(func=_login)


@one_line_errors()
def _login(args: argparse.Namespace) -> int:
    api_url = args.api or load_login().api_url
    with Client(api_url) as client:
        if args.token_stdin:
            token = sys.stdin.readline().strip()
            if not token:
                raise ApiError(0, "no token on stdin")
            client.set_token(token)
        else:
            email = args.email or input("Email: ").strip()
            password = sys.stdin.readline().rstrip("\n") if args.password_stdin else getpass.getpass("Password: ")
            if args.signup:
                client.signup(email, password)
            token = client.signin(email, password)
        me = client.me()  # the token works before it is stored
    path = save_login(Login(api_url=api_url, token=token))
    print(f"signed in to {api_url} as {me['email']} (login stored in {path})")
    return 0
