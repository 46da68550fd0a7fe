"""Polling for a condition another thread or process brings about: the one loop the dev stack and the tests
wait with."""

import time


def until(condition, timeout=10, what="the condition never came true", every=0.01):
    """Poll ``condition()`` every ``every`` seconds and return its first true value; raise TimeoutError(what)
    once ``timeout`` seconds have passed without one. ``what`` may be a function, called then, to name what
    was last seen. A condition that can tell it will never come true raises on its own."""
    deadline = time.monotonic() + timeout
    while not (result := condition()):
        if time.monotonic() >= deadline:
            raise TimeoutError(what() if callable(what) else what)
        time.sleep(every)
    return result
