"""Free loopback ports for the stack's servers.

Ports come from below the kernel's ephemeral range (32768+) so an outgoing connection can never take
one between the check and the server's bind, and so that ``port + 10000`` (where ``weed`` puts the
gRPC twin of every HTTP port) is also below it.
"""

import random
import socket
import threading

LOW, HIGH = 15000, 22700
GRPC_OFFSET = 10000

_lock = threading.Lock()
_handed_out: set[int] = set()


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port(with_grpc_twin: bool = False) -> int:
    """A port nobody listens on; with ``with_grpc_twin`` also ``port + 10000`` is free."""
    with _lock:
        for _ in range(1000):
            port = random.randrange(LOW, HIGH)  # noqa: S311 - spreading ports, not a secret
            twin_ok = not with_grpc_twin or (
                port + GRPC_OFFSET not in _handed_out and _bindable(port + GRPC_OFFSET)
            )
            if port not in _handed_out and _bindable(port) and twin_ok:
                _handed_out.add(port)
                if with_grpc_twin:
                    _handed_out.add(port + GRPC_OFFSET)
                return port
    raise RuntimeError("no free loopback port found")
