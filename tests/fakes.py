"""In-process fakes for unit tests: a requests transport adapter (the httpx MockTransport pattern)."""

import json

import jwt
import requests
from requests.adapters import BaseAdapter


def make_token(claims):
    return jwt.encode(claims, "test-secret-that-is-long-enough-32b", algorithm="HS256")


class Handler(BaseAdapter):
    """A requests adapter answering from ``route(method, path, body) -> (status, bytes | dict)``."""

    def __init__(self, route):
        super().__init__()
        self.route = route
        self.calls = []

    def send(self, request, stream=False, timeout=None, verify=True, cert=None, proxies=None):
        path = request.path_url
        body = request.body
        if isinstance(body, str):
            body = body.encode()
        self.calls.append((request.method, path, request.headers.get("Authorization")))
        result = self.route(request.method, path, body or b"", request.headers)
        if isinstance(result, Exception):
            raise result
        status, payload = result
        resp = requests.Response()
        resp.status_code = status
        resp.request = request
        resp.url = request.url
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        import io

        resp.raw = io.BytesIO(payload)
        return resp

    def close(self):
        pass


def session_for(handler):
    s = requests.Session()
    s.mount("http://", handler)
    return s
