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


def bounded(call, timeout, what="the call did not end in time"):
    """``call()``'s result, run on a thread of its own that must end within ``timeout`` seconds: a call that
    hangs (an open() of a FIFO, say) raises AssertionError(what) instead of hanging the caller (the thread is
    left behind, a daemon). The call's own exception is raised here."""
    import threading

    result = {}

    def run():
        try:
            result["value"] = call()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True, name="bounded")
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise AssertionError(f"{what} (within {timeout} s)")
    if "error" in result:
        raise result["error"]
    return result["value"]
