# cython: language_level=3, embedsignature=True
"""The JSON bodies of the loader's API (contract section 4) as pydantic models: what the routes read, each
field checked before a route runs, and what every error answers, for the OpenAPI document."""

from pydantic import BaseModel, Field


class Credentials(BaseModel):
    email: str = Field(min_length=1, max_length=320)
    password: str = Field(min_length=1, max_length=1024)


class LoadRequest(BaseModel):
    folder: str = Field(max_length=128)


class ErrorDetail(BaseModel):
    """The body of every error (contract section 4)."""

    detail: str


def errors_for(*codes):
    """OpenAPI ``responses`` for the error statuses a route answers, all ``{"detail": text}``; declaring 422
    also replaces FastAPI's default 422 body (a list), which the loader's handler (error_answers.pyx) never
    sends."""
    return {code: {"model": ErrorDetail} for code in codes}
