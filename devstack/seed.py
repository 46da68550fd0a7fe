"""Demo content for a fresh stack. The passwords are public on purpose: this is a local dev stack.

    operator@azaion.local / operator-demo-password   (Operator)
    uploader@azaion.local / uploader-demo-password   (ResourceUploader)
    models/demo-model.bin: 5 MiB of deterministic bytes (DEMO_MODEL_SHA256 checks a download)

Seeding again keeps the accounts (and their hardware binding), the key fragment and the model, so an
archive encrypted for this stack and a loader's model cache stay valid across restarts.
"""

import hashlib
import os
from dataclasses import dataclass

from botocore.exceptions import ClientError

from devstack.stack import Stack

DEMO_USERS = {
    "operator@azaion.local": ("operator-demo-password", ["Operator"]),
    "uploader@azaion.local": ("uploader-demo-password", ["ResourceUploader"]),
}
DEMO_FOLDER = "models"
DEMO_MODEL = "demo-model.bin"
DEMO_MODEL_SIZE = 5 * 1024 * 1024
KEY_FRAGMENT_SIZE = 64


def demo_model_bytes() -> bytes:
    return hashlib.shake_256(b"azaion devstack demo model").digest(DEMO_MODEL_SIZE)


DEMO_MODEL_SHA256 = hashlib.sha256(demo_model_bytes()).hexdigest()


@dataclass(frozen=True)
class Seeded:
    users: dict[str, tuple[str, list[str]]]
    folder: str
    model: str
    model_sha256: str
    key_fragment: bytes


def _published(stack: Stack) -> bool:
    if stack.admin.get_file(DEMO_FOLDER, DEMO_MODEL + ".small") is None:
        return False
    try:
        stack.s3_admin_client().head_object(Bucket=DEMO_FOLDER, Key=DEMO_MODEL + ".big")
    except ClientError:
        return False
    return True


def seed(stack: Stack, force: bool = False) -> Seeded:
    existing = {u["email"] for u in stack.admin.users()}
    for email, (password, roles) in DEMO_USERS.items():
        if force or email not in existing:
            stack.add_user(email, password, roles)
    if force or not _published(stack):
        stack.publish(DEMO_FOLDER, DEMO_MODEL, demo_model_bytes())
    fragment = None if force else stack.admin.key_fragment()
    if fragment is None:
        fragment = os.urandom(KEY_FRAGMENT_SIZE)
        stack.set_key_fragment(fragment)
    return Seeded(DEMO_USERS, DEMO_FOLDER, DEMO_MODEL, DEMO_MODEL_SHA256, fragment)
