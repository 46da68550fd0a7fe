import pickle

import pytest

import constants
import unlock_state
from credentials import Credentials
from user import User


def test_credentials_never_show_the_password():
    c = Credentials("op@azaion.local", "s3cr3t-Pa55")
    assert "s3cr3t" not in repr(c) and "s3cr3t" not in str(c) and "s3cr3t" not in f"{c}"
    assert c.email == "op@azaion.local"
    assert c.password == "s3cr3t-Pa55"
    with pytest.raises(TypeError):
        pickle.dumps(c)


def test_credentials_require_both_parts():
    with pytest.raises(ValueError):
        Credentials("", "x")
    with pytest.raises(ValueError):
        Credentials("a@b", "")


def test_user_from_short_claims():
    u = User.from_claims({"nameid": "42", "unique_name": "a@b.c", "role": "Operator", "exp": 1900000000})
    assert (u.id, u.email, u.roles, u.expires_at) == ("42", "a@b.c", ("Operator",), 1900000000)
    assert u.to_dict() == {"id": "42", "email": "a@b.c", "role": "Operator"}
    assert not u.can_upload


def test_user_from_long_dotnet_claims_with_role_list():
    u = User.from_claims(
        {
            "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier": "7",
            "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name": "up@b.c",
            "http://schemas.microsoft.com/ws/2008/06/identity/claims/role": ["Validator", "ResourceUploader"],
        }
    )
    assert (u.id, u.email, u.roles) == ("7", "up@b.c", ("Validator", "ResourceUploader"))
    assert u.can_upload
    assert u.expires_at is None


def test_user_email_claim_and_unknown_roles_kept_as_text():
    u = User.from_claims({"nameid": 5, "email": "e@x", "role": "FieldEngineer"})
    assert u.id == "5" and u.email == "e@x" and u.role == "FieldEngineer" and not u.can_upload


@pytest.mark.parametrize("role", sorted(constants.UPLOAD_ROLES))
def test_upload_roles(role):
    assert User.from_claims({"role": role}).can_upload


def test_user_without_claims_is_empty_not_an_error():
    u = User.from_claims({})
    assert (u.id, u.email, u.roles, u.role) == ("", "", (), "")


@pytest.mark.parametrize("exp", [0, 1900000000, 1900000000.7, constants.MAX_JWT_EXP])
def test_user_exp_in_range_is_whole_seconds(exp):
    assert User.from_claims({"exp": exp}).expires_at == int(exp)


@pytest.mark.parametrize(
    "exp",
    [float("inf"), float("-inf"), float("nan"), -1, constants.MAX_JWT_EXP + 1, 10**400, True, "1900000000"],
    ids=["inf", "-inf", "nan", "-1", "max+1", "10**400", "True", "text"],
)
def test_user_exp_that_is_no_time_is_refused(exp):
    """An exp of 1e999 (inf) was an OverflowError, NaN a ValueError from int(), a string silently ignored."""
    with pytest.raises(ValueError, match="exp is not a time"):
        User.from_claims({"nameid": "1", "exp": exp})


def test_unlock_states_are_the_contracts_seven():
    assert unlock_state.STATES == (
        "idle",
        "authenticating",
        "downloading_key",
        "decrypting",
        "loading_images",
        "ready",
        "error",
    )


def test_unlock_status_runs_one_at_a_time_and_restarts_from_error():
    s = unlock_state.UnlockStatus()
    assert s.snapshot() == {"state": "idle", "error": None, "bytesDone": 0, "bytesTotal": 0, "images": []}
    assert s.try_begin()
    assert not s.try_begin()
    s.set_state(unlock_state.DECRYPTING)
    s.set_total(100)
    s.add_done(40)
    assert s.snapshot()["bytesDone"] == 40
    s.fail("archive missing")
    assert s.snapshot()["state"] == "error" and s.snapshot()["error"] == "archive missing"
    assert s.try_begin()
    assert s.snapshot() == {
        "state": "authenticating",
        "error": None,
        "bytesDone": 0,
        "bytesTotal": 0,
        "images": [],
    }
    s.succeed(["a:1", "b:2"])
    assert s.snapshot()["images"] == ["a:1", "b:2"] and s.state == "ready"
    with pytest.raises(ValueError):
        s.set_state("bogus")


def test_split_constants_and_defaults():
    assert constants.SPLIT_SMALL_MAX == 3072
    assert constants.RESOURCE_KEY_STRING == "azaion-loader/resource-key/v1"
