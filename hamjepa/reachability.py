"""Addressed services probed before any work, each with a timeout of a few seconds: a Ray cluster named by
--address (or $RAY_ADDRESS) must accept a TCP connection at its port.

Why: `ray.init(address=...)` to a closed port or an unrouted host waits for Ray's own timeouts (over 90 s was
measured) before a traceback; a refused or silent port is said in one sentence at once instead. The probe only
opens and closes a TCP connection: it proves something listens, not that it is Ray (ray.init still says that).
"""

from __future__ import annotations

import socket

from hamjepa.errors import UserError

RAY_PROBE_TIMEOUT_S = 3  # seconds a Ray address has to accept a connection; a live head answers in milliseconds


def _host_and_port(address: str) -> tuple[str, int]:
    """'ray://host:port', 'host:port' or '[v6]:port' (checks.ray_address checked the form) -> (host, port)."""
    rest = address.removeprefix("ray://")
    host, _, port = rest.rpartition(":")
    return host.strip("[]"), int(port)


def ray_reachable(address: str | None, named: str = "--address") -> None:
    """One sentence (UserError) unless `address` ('auto', 'local' and None are not addresses: not probed) accepts
    a TCP connection within RAY_PROBE_TIMEOUT_S."""
    if not address or address in ("auto", "local"):
        return
    host, port = _host_and_port(address)
    try:
        socket.create_connection((host, port), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as error:
        why = "no answer" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        raise UserError(f"{named} = '{address}' cannot be reached ({why} within {RAY_PROBE_TIMEOUT_S} s); start the "
                        "cluster (`ray start --head`), check the host and port, or omit it to start a local Ray.") \
            from None
