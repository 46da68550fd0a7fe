# cython: language_level=3, embedsignature=True
"""The loader's log: its level (the libraries' DEBUG output never shown, for it prints secrets) and request
paths made printable (a percent-decoded path must not forge a log line)."""

import logging


def configure_logging(level):
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s %(message)s")
    # LOG_LEVEL=DEBUG is for the loader's own loggers. The libraries' DEBUG output prints whole requests
    # (botocore: the Authorization header with the CDN access key, and every signing step), so theirs
    # stays at INFO at most.
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "docker"):
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLogger().level))
    # api_client tells each retry of the Resource API in the loader's own words; urllib3's own warning of a
    # retry after a broken connection would tell it twice.
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def printable(text):
    """Text from outside (a percent-decoded request path, a header, a peer's value) fit for a log line or a
    message: each character that is not printable escaped, so a newline cannot forge a log line."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)
