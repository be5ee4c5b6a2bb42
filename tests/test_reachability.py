"""reachability.py: an addressed Ray is probed before any work, and `auto` must find a running cluster to probe.

No Ray is started: a listening socket stands in for a head, and Ray's own search for `auto` reads a temp folder of
the test's (RAY_TMPDIR) with no raylet among the processes.
"""

import socket

import pytest

from hamjepa import reachability
from hamjepa.errors import UserError


@pytest.fixture
def no_cluster(tmp_path, monkeypatch):
    """This machine as `ray.init(address="auto")` sees it with no cluster: Ray's temp folder of the test's, no
    raylet process, no $RAY_ADDRESS (another process's Ray must not answer)."""
    import ray._private.services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr(ray._private.services, "find_gcs_addresses", lambda: frozenset())
    return tmp_path


# A head's address on the loopback: 127.0.0.2, since Ray turns 127.0.0.1 and localhost into this machine's own
# network address, which the tests do not use.
HEAD_HOST = "127.0.0.2"


@pytest.fixture
def head():
    """Something listening: what the probe accepts as a head."""
    with socket.socket() as listener:
        listener.bind((HEAD_HOST, 0))
        listener.listen()
        yield f"{HEAD_HOST}:{listener.getsockname()[1]}"


def recorded(no_cluster, address: str) -> None:
    """What `ray start --head` records: its address in ray_current_cluster, in Ray's temp folder ($RAY_TMPDIR/ray)."""
    (no_cluster / "ray").mkdir(exist_ok=True)
    (no_cluster / "ray" / "ray_current_cluster").write_text(address)


def test_auto_with_no_cluster_running_is_one_sentence(no_cluster):
    with pytest.raises(UserError, match=r"^--address = 'auto' finds no running Ray cluster on this machine; start "
                                        r"one \(`ray start --head`\)") as refused:
        reachability.ray_reachable("auto")
    assert "\n" not in str(refused.value)
    with pytest.raises(UserError, match=r"^\$RAY_ADDRESS = 'auto' finds no"):
        reachability.ray_reachable("auto", "$RAY_ADDRESS")


def test_auto_probes_the_cluster_the_last_ray_start_recorded(no_cluster, head):
    recorded(no_cluster, head)
    assert reachability.running_cluster() == head
    reachability.ray_reachable("auto")  # something listens there: accepted


def test_auto_naming_a_stopped_cluster_is_refused_at_once(no_cluster):
    with socket.socket() as closed:  # a port nothing listens on once this socket is closed
        closed.bind((HEAD_HOST, 0))
        stale = f"{HEAD_HOST}:{closed.getsockname()[1]}"
    recorded(no_cluster, stale)  # left behind by a head that died
    with pytest.raises(UserError, match=rf"--address = 'auto' \(the Ray cluster at '{stale}'\) cannot be reached"):
        reachability.ray_reachable("auto")


def test_auto_follows_ray_address_as_ray_does(no_cluster, head, monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", head)
    assert reachability.running_cluster() == head


def test_an_address_is_probed_and_local_is_not(head):
    reachability.ray_reachable(head)
    reachability.ray_reachable("local")
    reachability.ray_reachable(None)
    with pytest.raises(UserError, match="--address = '127.0.0.1:9' cannot be reached"):
        reachability.ray_reachable("127.0.0.1:9")
