"""Demo content for a fresh stack. The passwords are public on purpose: this is a local dev stack.

    operator@azaion.local / operator-demo-password   (Operator)
    uploader@azaion.local / uploader-demo-password   (ResourceUploader)
    models/demo-model.bin:   5 MiB of deterministic bytes, format 2, its manifest signed by the stack's
                             publisher key (Stack.publisher); DEMO_MODEL_SHA256 checks a download
    models/legacy-model.bin: 1 MiB of deterministic bytes, format 1, no manifest (LEGACY_MODEL_SHA256)

Seeding again keeps the accounts (and their hardware binding), the key fragment and the models, so an
archive encrypted for this stack and a loader's model cache stay valid across restarts. A model stored in
the wrong format (a stack seeded before format 2 has a demo model without a manifest, one seeded before
section 9 an unsigned manifest) is published again.
"""

import hashlib
import os
from dataclasses import dataclass

from botocore.exceptions import ClientError

from devstack import signing
from devstack.split import manifest_name
from devstack.stack import Stack

DEMO_USERS = {
    "operator@azaion.local": ("operator-demo-password", ["Operator"]),
    "uploader@azaion.local": ("uploader-demo-password", ["ResourceUploader"]),
}
DEMO_FOLDER = "models"
DEMO_MODEL = "demo-model.bin"
DEMO_MODEL_SIZE = 5 * 1024 * 1024
LEGACY_MODEL = "legacy-model.bin"
LEGACY_MODEL_SIZE = 1024 * 1024
KEY_FRAGMENT_SIZE = 64


def demo_model_bytes() -> bytes:
    return hashlib.shake_256(b"azaion devstack demo model").digest(DEMO_MODEL_SIZE)


def legacy_model_bytes() -> bytes:
    return hashlib.shake_256(b"azaion devstack legacy model").digest(LEGACY_MODEL_SIZE)


DEMO_MODEL_SHA256 = hashlib.sha256(demo_model_bytes()).hexdigest()
LEGACY_MODEL_SHA256 = hashlib.sha256(legacy_model_bytes()).hexdigest()


@dataclass(frozen=True)
class Seeded:
    users: dict[str, tuple[str, list[str]]]
    folder: str
    model: str  # format 2, signed
    model_sha256: str
    key_fragment: bytes
    legacy_model: str = LEGACY_MODEL  # format 1
    legacy_model_sha256: str = LEGACY_MODEL_SHA256


def _signed_by_the_stack(stack: Stack, name: str, manifest: bytes) -> bool:
    try:
        signing.open_envelope(manifest, stack.publisher.public_key, DEMO_FOLDER, name)
    except ValueError:
        return False
    return True


def _published(stack: Stack, name: str, model_format: int) -> bool:
    """Both parts are there, and a manifest exactly when ``model_format`` is 2, signed by the stack."""
    if stack.admin.get_file(DEMO_FOLDER, name + ".small") is None:
        return False
    manifest = stack.admin.get_file(DEMO_FOLDER, manifest_name(name))
    if (manifest is not None) != (model_format == 2):
        return False
    if manifest is not None and not _signed_by_the_stack(stack, name, manifest):
        return False
    try:
        stack.s3_admin_client().head_object(Bucket=DEMO_FOLDER, Key=name + ".big")
    except ClientError:
        return False
    return True


def seed(stack: Stack, force: bool = False) -> Seeded:
    existing = {u["email"] for u in stack.admin.users()}
    for email, (password, roles) in DEMO_USERS.items():
        if force or email not in existing:
            stack.add_user(email, password, roles)
    for name, model_bytes, model_format in (
        (DEMO_MODEL, demo_model_bytes, 2),
        (LEGACY_MODEL, legacy_model_bytes, 1),
    ):
        if force or not _published(stack, name, model_format):
            signer = stack.publisher if model_format == 2 else None
            stack.publish(DEMO_FOLDER, name, model_bytes(), format=model_format, signer=signer)
    fragment = None if force else stack.admin.key_fragment()
    if fragment is None:
        fragment = os.urandom(KEY_FRAGMENT_SIZE)
        stack.set_key_fragment(fragment)
    return Seeded(DEMO_USERS, DEMO_FOLDER, DEMO_MODEL, DEMO_MODEL_SHA256, fragment)
