"""Addressed services probed before any work, each with a timeout of a few seconds: a Ray cluster named by
--address (or $RAY_ADDRESS) must accept a TCP connection at its port, and `auto` must find a cluster to name.

Why: `ray.init(address=...)` to a closed port or an unrouted host waits for Ray's own timeouts (over 90 s was
measured) before a traceback; a refused or silent port is said in one sentence at once instead. The probe only
opens and closes a TCP connection: it proves something listens, not that it is Ray (ray.init still says that).
`auto` is resolved first, as Ray resolves it, so that with no cluster running the refusal comes before the
command's other work (`hamjepa train` opens, and may create, the MLflow store before it connects Ray).
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


def running_cluster(named: str = "--address") -> str:
    """The cluster `ray.init(address="auto")` would join, found as Ray finds it: $RAY_ADDRESS, else the address the
    last `ray start` on this machine recorded (ray_current_cluster in Ray's temp folder, $RAY_TMPDIR or /tmp/ray),
    else a raylet among this machine's processes; one sentence (UserError) when there is none.

    Ray's own search, so the answer is the one ray.init gets: a private function, pinned with Ray (ray < 3 in
    pyproject.toml) and exercised by the tests. It imports Ray (half a second), paid only for 'auto'.
    """
    from ray._private.services import canonicalize_bootstrap_address

    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:  # Ray's "Could not find any running Ray instance"
        found = None
    except ValueError as error:  # $RAY_ADDRESS in a form Ray cannot use
        raise UserError(f"{named} = 'auto' leads Ray to an address it cannot use ({error}); set $RAY_ADDRESS to "
                        "host:port, or pass --address host:port.") from None
    if not found:
        raise UserError(f"{named} = 'auto' finds no running Ray cluster on this machine; start one (`ray start "
                        f"--head`), pass --address host:port of a running head, or omit {named} to start a local "
                        "Ray.")
    return found


def ray_reachable(address: str | None, named: str = "--address") -> None:
    """One sentence (UserError) unless `address` accepts a TCP connection within RAY_PROBE_TIMEOUT_S: 'auto' is
    the running cluster it finds (`running_cluster`); 'local' and None are not addresses (not probed)."""
    if not address or address == "local":
        return
    shown = f"{named} = '{address}'"
    if address == "auto":
        address = running_cluster(named)
        shown = f"{named} = 'auto' (the Ray cluster at '{address}')"
    host, port = _host_and_port(address)
    try:
        socket.create_connection((host, port), timeout=RAY_PROBE_TIMEOUT_S).close()
    except OSError as error:
        why = "no answer" if isinstance(error, TimeoutError) else (error.strerror or type(error).__name__)
        raise UserError(f"{shown} cannot be reached ({why} within {RAY_PROBE_TIMEOUT_S} s); start the cluster (`ray "
                        "start --head`), check the host and port, or omit it to start a local Ray.") from None
