# cython: language_level=3, embedsignature=True
"""The logged-in user, read from the claims of the Resource API's JWT (contract section 3)."""

from constants import MAX_JWT_EXP, UPLOAD_ROLES

ID_CLAIMS = ("nameid", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier")
EMAIL_CLAIMS = ("unique_name", "email", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/name")
ROLE_CLAIMS = ("role", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role")


def _first(dict claims, tuple names):
    for name in names:
        value = claims.get(name)
        if value is not None and value != "":
            return value
    return None


def _expires_at(exp):
    """The JWT's exp as whole seconds, None when absent; ValueError unless a number 0..MAX_JWT_EXP (an exp of
    1e999 or NaN is no time: int() of it raises OverflowError or ValueError)."""
    if exp is None:
        return None
    if isinstance(exp, bool) or not isinstance(exp, (int, float)) or not 0 <= exp <= MAX_JWT_EXP:
        raise ValueError(f"exp is not a time (seconds 0..{MAX_JWT_EXP})")  # NaN fails every comparison
    return int(exp)


def _roles(value):
    """A role claim may be a string or a list; unknown roles are kept as text, never an error."""
    if value is None:
        return ()
    if isinstance(value, (list, tuple)):
        return tuple(str(v) for v in value if v is not None and str(v) != "")
    return (str(value),)


cdef class User:
    cdef readonly str id
    cdef readonly str email
    cdef readonly tuple roles
    cdef readonly object expires_at

    def __init__(self, str id, str email, roles=(), expires_at=None):
        self.id = id
        self.email = email
        self.roles = _roles(roles)
        self.expires_at = expires_at

    @staticmethod
    def from_claims(dict claims):
        """Build a user from decoded JWT claims: short names or the long .NET claim URIs. ValueError when its
        exp is present but no time (not a number from 0 to MAX_JWT_EXP)."""
        user_id = _first(claims, ID_CLAIMS)
        email = _first(claims, EMAIL_CLAIMS)
        expires_at = _expires_at(claims.get("exp"))
        return User("" if user_id is None else str(user_id), "" if email is None else str(email),
                    _roles(_first(claims, ROLE_CLAIMS)), expires_at)

    @property
    def role(self):
        """The role as the API shows it: one role as text, several joined with commas."""
        return ",".join(self.roles)

    @property
    def can_upload(self):
        return any(r in UPLOAD_ROLES for r in self.roles)

    def to_dict(self):
        return {"id": self.id, "email": self.email, "role": self.role}

    def __repr__(self):
        return f"User(id={self.id!r}, email={self.email!r}, roles={self.roles!r})"
