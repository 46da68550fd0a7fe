# cython: language_level=3, embedsignature=True
"""How long each kind of the loader's work may take before it counts as stuck, from the settings (``s``,
main.Settings): a worker of the load or the login pool held longer makes /health say the loader cannot
serve (workers.pyx); an unlock that stays longer in one state is in ``error`` (unlock_state.pyx)."""


def load(s):
    """How long a worker of the load pool may be held: a load makes two Resource API calls in turn at most
    (the session's cdn.yaml, then its parts), may wait for a CDN download's resumes (a crawling transfer is
    dropped at most two windows of CDN_SPEED_TIME after it began to crawl, each try) and for room in the
    memory budget (freed by loads that end or are cut off)."""
    import constants

    cdn_stall = (constants.CDN_RESUMES + 1) * 2 * s.cdn_speed_time + 2
    return 2 * s.api_deadline + cdn_stall + s.client_stall_timeout + 30


def login(s):
    """How long a worker of the login pool may be held: a login waits for the Resource API at most
    API_DEADLINE, its retries included."""
    return s.api_deadline + 5


def unlock(s):
    """The seconds an unlock may stay in each running state."""
    import constants

    engine = 2 * constants.ENGINE_TIMEOUT
    return {
        constants.AUTHENTICATING: 2 * s.api_deadline + engine + 5,
        constants.DOWNLOADING_KEY: s.api_deadline + 5,
        constants.DECRYPTING: constants.ENGINE_LOAD_TIMEOUT,
        constants.LOADING_IMAGES: constants.ENGINE_LOAD_TIMEOUT,
    }
