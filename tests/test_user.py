"""user: the logged-in user from the claims of the Resource API's JWT (contract section 3)."""

import pytest

import constants
from user import User


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
