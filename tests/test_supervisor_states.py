"""The supervisor's table of states and its addresses, without processes."""

from __future__ import annotations

import os

import pytest

from trioproxy.addresses import ServerAddress
from trioproxy.config import make_server_process
from trioproxy.lifecycle import Idle, PortTaken, Ready, StartAsked, StartFailed
from trioproxy.supervisor import TRANSITIONS, InvalidTransition, ServerSupervisor, State


def supervisor() -> ServerSupervisor:
    return ServerSupervisor(make_server_process("web", {"command": ["true"]}))


def test_every_state_has_a_row() -> None:
    assert set(TRANSITIONS) == set(State)
    assert State.READY not in TRANSITIONS[State.STOPPING]  # a stop ends; it never leaves a process ready
    assert State.READY not in TRANSITIONS[State.STOPPED]  # a server is started before it is ready


def test_an_event_outside_the_table_is_refused() -> None:
    # The table replaced _set_state: a supervisor's state changes only by events.
    web = supervisor()
    with pytest.raises(InvalidTransition, match="web: Ready in state stopped"):
        web.feed(Ready(1, 0.0, "nowhere"))
    web.lifecycle.handle(StartAsked())
    web.lifecycle.handle(PortTaken(8000))  # restated with a reason: fine
    web.lifecycle.handle(StartFailed("broken", 0.0))
    with pytest.raises(InvalidTransition, match="web: Idle in state failed"):
        web.feed(Idle(5))
    assert web.state is State.FAILED and web.reason == "broken"


def test_a_chosen_port_is_kept_and_replaced_only_when_taken() -> None:
    address = ServerAddress(0, False)
    address.prepare()
    first = address.port
    assert first != 0
    address.prepare()
    assert address.port == first  # kept across restarts
    assert address.taken(["OSError: [Errno 98] Address already in use"])
    assert not address.taken(["ImportError: no module named x"])
    address.choose_another_port()
    address.prepare()
    assert address.port != 0
    assert not ServerAddress(8123, False).taken(["Address already in use"])  # a configured port stays


def test_a_private_socket_directory_is_removed_on_close(tmp_path: object) -> None:
    address = ServerAddress(0, True)
    assert address.owned_dir is not None and address.unix_socket is not None
    open(address.unix_socket, "w").close()  # a stale socket file
    address.prepare()
    assert not os.path.exists(address.unix_socket)
    address.close()
    assert not os.path.exists(address.owned_dir)
    assert ServerAddress(0, "/tmp/given.sock").owned_dir is None


def test_the_split_modules_import_in_any_order_and_share_their_names() -> None:
    import subprocess
    import sys

    code = (
        "import trioproxy.registry as r, trioproxy.supervisor as s, trioproxy.lifecycle as l;"
        "assert s.Supervisors is r.Supervisors and s.ServerUnavailable is l.ServerUnavailable and s.State is l.State;"
        "import trioproxy; assert trioproxy.Supervisors is r.Supervisors"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
