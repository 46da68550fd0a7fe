"""credentials: a user's email and password, never shown and never pickled."""

import pickle

import pytest

from credentials import Credentials


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
