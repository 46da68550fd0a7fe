# cython: language_level=3, embedsignature=True
"""A user's email and password, held in memory only and never shown."""


cdef class Credentials:
    """Email and password. ``repr``/``str`` never show the password; there is no way to serialise it."""

    cdef readonly str email
    cdef readonly str password

    def __init__(self, str email, str password):
        if not email or not password:
            raise ValueError("email and password are required")
        self.email = email
        self.password = password

    def __repr__(self):
        return f"Credentials(email={self.email!r}, password=***)"

    def __str__(self):
        return self.__repr__()

    def __reduce__(self):
        raise TypeError("credentials cannot be pickled")

    def __eq__(self, other):
        if not isinstance(other, Credentials):
            return NotImplemented
        return self.email == other.email and self.password == other.password

    def __hash__(self):
        return hash((self.email, self.password))
