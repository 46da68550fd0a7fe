"""``python -m devstack <command>``.

stack   run SeaweedFS and the reference Resource API in the foreground, seeded with demo content
"""

import argparse
import os
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
        f"publisher     {stack.publisher_key_files[1]}  (TRUSTED_PUBLISHERS: it signed the demo model)\n"
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
    stack.add_argument("--no-seed", action="store_true", help="skip the demo users, models and key fragment")
    stack.set_defaults(func=cmd_stack)

    run = commands.add_parser("run", help="the stack, a Docker Engine, a demo archive and the loader")
    run.add_argument("--data-dir", type=Path, default=Path("devstack-data"))
    run.add_argument("--port", type=int, default=int(os.environ.get("LOADER_PORT", "8080")))
    run.set_defaults(func=lambda a: __import__("devstack.run", fromlist=["run"]).run(a.data_dir, a.port))

    images = commands.add_parser("publish-images", help="encrypt local images into the device's archive")
    images.add_argument("--out", type=Path, required=True, help="the archive to write")
    images.add_argument(
        "--fragment-file", type=Path, help="key fragment (default: random, written beside --out)"
    )
    images.add_argument("--api-url", help="reference Resource API to register the fragment with")
    images.add_argument("--admin-secret", help="its X-Devstack-Admin secret")
    images.add_argument("images", nargs="+", help="name:tag of local images")
    images.set_defaults(func=cmd_publish_images)
    return parser


def cmd_publish_images(args: argparse.Namespace) -> int:
    from devstack.api.admin_client import AdminClient
    from devstack.images import publish_images

    fragment = args.fragment_file.read_bytes() if args.fragment_file and args.fragment_file.exists() else None
    admin = AdminClient(args.api_url, args.admin_secret) if args.api_url and args.admin_secret else None
    fragment = publish_images(os.environ.get("DOCKER_HOST"), args.images, args.out, admin, fragment)
    if args.fragment_file is None:
        path = args.out.with_name(args.out.name + ".fragment")
        path.write_bytes(fragment)
        path.chmod(0o600)
        print(f"key fragment written to {path}")
    print(f"archive {args.out}: {', '.join(args.images)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
