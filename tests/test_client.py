"""baton_client's failures without a Baton server: what a client sees when the server is not there, or
its stream breaks. Each is a BatonError saying so, never a urllib or http.client traceback."""

import json
import socket
import threading

import pytest

from baton_client import BatonClient, BatonError


def _one_shot_server(reply: bytes) -> tuple[str, threading.Thread]:
    """A socket that answers one HTTP request with `reply` and closes."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data:                      # the whole request: unread bytes at
                data += conn.recv(65536)                            # close would make it a reset (RST)
            head, body = data.split(b"\r\n\r\n", 1)
            length = next(int(v) for k, v in (ln.split(b":", 1) for ln in head.split(b"\r\n")[1:])
                          if k.strip().lower() == b"content-length")
            while len(body) < length:
                body += conn.recv(65536)
            conn.sendall(reply)
            conn.shutdown(socket.SHUT_WR)                           # then an orderly close (FIN)
            while conn.recv(65536):
                pass
        srv.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return f"127.0.0.1:{srv.getsockname()[1]}", t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_an_unreachable_http_server_is_a_baton_error():
    with pytest.raises(BatonError, match=r"cannot reach http://127\.0\.0\.1:\d+: .*refused"):
        BatonClient(f"127.0.0.1:{_free_port()}", "http").generate("hi", max_tokens=2)


SSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
EVENT = {"text_output": "x", "token_ids": [5], "finish_reason": "", "prompt_tokens": 1, "completion_tokens": 1}


@pytest.mark.parametrize("reply, message", [
    (SSE + b"Connection: close\r\n\r\n" + f"data: {json.dumps(EVENT)}\n\n".encode(),
     "the stream ended without a final response"),
    (SSE + b"Transfer-Encoding: chunked\r\n\r\n400\r\ndata: {\"text_output\"", "broke"),    # cut mid-chunk
    (SSE + b"Connection: close\r\n\r\ndata: {not json\n\n", "sent a malformed event"),
], ids=["no final response", "cut mid-chunk", "malformed event"])
def test_a_broken_stream_is_a_baton_error(reply, message):
    url, t = _one_shot_server(reply)
    with pytest.raises(BatonError, match=message):
        list(BatonClient(url, "http").stream("hi", max_tokens=4))
    t.join(5)
