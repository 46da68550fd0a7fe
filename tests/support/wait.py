"""Polling for a condition another thread or process brings about."""

import time


def until(condition, timeout=10, what="the condition never came true", every=0.01):
    """Return once ``condition()`` is true; fail the test with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(every)
