"""constants: the names and numbers the wire contract fixes (docs/contract.md)."""

import constants


def test_split_constants_and_defaults():
    assert constants.SPLIT_SMALL_MAX == 3072
    assert constants.RESOURCE_KEY_STRING == "azaion-loader/resource-key/v1"
