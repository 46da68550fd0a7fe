"""``python -m devstack <command>``.

stack   run SeaweedFS and the reference Resource API in the foreground, seeded with demo content
"""

import argparse
import signal
import sys
import threading
from pathlib import Path

from devstack.seed import DEMO_USERS, seed
from devstack.stack import Stack


def _wait_for_signal() -> None:
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()


def describe(stack: Stack) -> str:
    users = "\n".join(
        f"  {email} / {password}  ({', '.join(roles)})" for email, (password, roles) in DEMO_USERS.items()
    )
    return (
        f"Resource API  {stack.api_url}\n"
        f"S3 (CDN)      {stack.s3_endpoint}\n"
        f"admin secret  {stack.admin_secret}  (header X-Devstack-Admin for {stack.api_url}/_devstack/)\n"
        f"data          {stack.data_dir}\n"
        f"demo users\n{users}"
    )


def cmd_stack(args: argparse.Namespace) -> int:
    with Stack(args.data_dir, api_port=args.api_port, s3_port=args.s3_port) as stack:
        if not args.no_seed:
            seed(stack)
        print(describe(stack), flush=True)
        print("Ctrl-C stops the stack.", flush=True)
        _wait_for_signal()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m devstack", description="Azaion.Loader local dev stack")
    commands = parser.add_subparsers(dest="command", required=True)

    stack = commands.add_parser("stack", help="run SeaweedFS and the reference Resource API")
    stack.add_argument("--data-dir", type=Path, default=Path("devstack-data"))
    stack.add_argument("--api-port", type=int, default=None, help="default: a free port")
    stack.add_argument("--s3-port", type=int, default=None, help="default: a free port")
    stack.add_argument("--no-seed", action="store_true", help="skip the demo users, model and key fragment")
    stack.set_defaults(func=cmd_stack)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
