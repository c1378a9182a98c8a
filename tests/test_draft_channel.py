"""The draft stage's node-local socket (stages/draft_channel.py): the wire format, failures reported
to the caller, late replies dropped, and a missing stage noticed at once."""

from __future__ import annotations

import contextlib
import threading
import time

import numpy as np
import pytest

from baton.backends.stages.draft_channel import (
    CALL_NAMES,
    REPLY_NAMES,
    DraftChannel,
    DraftChannelServer,
    pack,
    unpack,
)
from baton.backends.stages.messages import DraftCall, DraftReply


def test_a_call_and_its_reply_cross_the_wire_unchanged():
    call = DraftCall([7, 1 << 40], [0, 12], [[5, 6, 7], [9]], 3, release=[3])
    back = DraftCall.from_arrays(unpack(pack(call.to_arrays(), CALL_NAMES), CALL_NAMES))
    assert back == call
    reply = DraftReply([[1, 2, 3], []], [3, 13])
    assert DraftReply.from_arrays(unpack(pack(reply.to_arrays(3), REPLY_NAMES), REPLY_NAMES), 3) == reply


@pytest.mark.parametrize("buf, why", [
    (b"\x01\x02\x03", "whole int64"),
    (np.asarray([5, 1], dtype=np.int64).tobytes(), "'keys' is missing or longer"),
    (np.asarray([0, 0, 0, 0, 1, 3, 0, 9], dtype=np.int64).tobytes(), "bytes after the last array"),
])
def test_a_malformed_message_is_refused_by_name(buf, why):
    with pytest.raises(ValueError, match=why):
        unpack(buf, CALL_NAMES)


@pytest.fixture
def address(tmp_path):
    return f"ipc://{tmp_path}/draft.sock"


def test_the_server_answers_and_reports_a_failed_call_without_stopping(address):
    def handle(arrays):
        call = DraftCall.from_arrays(arrays)
        if call.k == 9:
            raise RuntimeError("the draft model broke")
        return DraftReply([[t + 1 for t in toks[-1:]] for toks in call.tokens], [s + len(t) for s, t in
                                                                                zip(call.starts, call.tokens)]).to_arrays(call.k)

    server = DraftChannelServer(address, handle)
    client = DraftChannel(address, timeout_s=5, connect_wait_s=5)
    try:
        with pytest.raises(RuntimeError, match="the draft model broke"):
            client.call(DraftCall([1], [0], [[4]], 9).to_arrays())
        with pytest.raises(RuntimeError, match="lengths"):          # the stage's own check, relayed
            client.call({**DraftCall([1], [0], [[4]], 2).to_arrays(), "lengths": np.asarray([0])})
        out = DraftReply.from_arrays(client.call(DraftCall([1, 2], [0, 5], [[4], [8, 9]], 2).to_arrays()), 2)
        assert out == DraftReply([[5], [10]], [1, 7])
    finally:
        client.close()
        server.close()


def test_a_late_reply_is_dropped_and_the_next_call_gets_its_own(address):
    slow = threading.Event()

    def handle(arrays):
        call = DraftCall.from_arrays(arrays)
        if call.keys == [1]:
            slow.wait(5)                       # answers after the caller gave up
        return DraftReply([[call.keys[0]]], [0]).to_arrays(call.k)

    server = DraftChannelServer(address, handle)
    client = DraftChannel(address, timeout_s=0.2, connect_wait_s=5)
    try:
        with pytest.raises(TimeoutError):
            client.call(DraftCall([1], [0], [[4]], 1).to_arrays())
        slow.set()
        time.sleep(0.1)                        # the late reply to call 1 is on its way
        client.timeout_ms = 5000
        assert DraftReply.from_arrays(client.call(DraftCall([2], [0], [[4]], 1).to_arrays()), 1).drafts == [[2]]
    finally:
        client.close()
        server.close()


def test_no_stage_listening_fails_the_call_at_once(address):
    client = DraftChannel(address, timeout_s=5)         # waits CONNECT_WAIT_S for a connection, not 5 s
    t = time.monotonic()
    with pytest.raises(ConnectionError, match="no draft stage is listening"):
        client.call(DraftCall([1], [0], [[4]], 1).to_arrays())
    assert time.monotonic() - t < 1
    client.close()


def test_closing_during_a_long_call_leaves_the_socket_to_its_thread(address):
    """close() must not close the socket under a thread still answering a call (zmq sockets are not
    thread-safe): that thread finishes its reply, then closes the socket itself. Whether the reply
    reaches the caller is not asserted: an IMMEDIATE DEALER drops unread messages when its peer
    disconnects (measured: 4-34% of replies sent just before the close)."""
    started, release, answered = threading.Event(), threading.Event(), threading.Event()

    def handle(arrays):
        started.set()
        release.wait(5)
        answered.set()
        call = DraftCall.from_arrays(arrays)
        return DraftReply([[7]], [1]).to_arrays(call.k)

    server = DraftChannelServer(address, handle)
    client = DraftChannel(address, timeout_s=1, connect_wait_s=5)
    failed = []                                     # exceptions on the serving thread (a send on a closed socket)
    hook, threading.excepthook = threading.excepthook, lambda a: failed.append(a.exc_value)
    try:
        def call():
            with contextlib.suppress(TimeoutError):     # the reply may be lost: see the docstring
                client.call(DraftCall([1], [0], [[4]], 1).to_arrays())

        caller = threading.Thread(target=call)
        caller.start()
        assert started.wait(5)
        server.close(wait_s=0.05)                   # returns while the call is still being answered
        assert server.thread.is_alive() and not server.sock.closed
        release.set()
        server.thread.join(5)
        caller.join(5)
        assert answered.is_set() and not server.thread.is_alive() and server.sock.closed
        assert failed == []
    finally:
        threading.excepthook = hook
        release.set()
        client.close()
