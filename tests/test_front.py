"""The llm front's relay and its loopback calls, without a server (test_serving runs them in one)."""

import numpy as np
import pytest

from baton import SamplingParams
from baton.backends.stages.front import Calls, FrontError, relay
from baton.backends.stages.loopback import decode, encode
from baton.backends.stages.messages import PrefillRequest, TokenDelta, error_delta


def _echo(msg):
    """A response laid out like the request's inputs (what a stage returning them would send)."""
    from tritonclient.grpc import service_pb2

    return service_pb2.ModelInferResponse(outputs=[service_pb2.ModelInferResponse.InferOutputTensor(
        name=t.name, datatype=t.datatype, shape=t.shape) for t in msg.inputs], raw_output_contents=msg.raw_input_contents)


def test_loopback_messages_round_trip_every_tensor_type():
    req = PrefillRequest("r1", [5, 6, 7], SamplingParams(temperature=0.5, max_tokens=9))
    delta = TokenDelta("r1", [3, 4], "héllo", "length", 3, 2, 0, [-0.5, -1.0])
    for arrays in (req.to_arrays(), delta.to_arrays(), {"empty": np.zeros((0,), np.int64)}):
        msg = encode("m", arrays, ["out"])
        assert msg.model_name == "m" and [o.name for o in msg.outputs] == ["out"]
        back = decode(_echo(msg))
        assert back.keys() == arrays.keys()
        for k, a in arrays.items():
            assert back[k].shape == a.shape and back[k].tolist() == a.tolist(), k
    assert PrefillRequest.from_arrays(decode(_echo(encode("m", req.to_arrays(), [])))) == req


class _Cancel:
    def __init__(self):
        self.sent = []

    def send(self, request_id):
        self.sent.append(request_id)


def _calls(deltas, cancelled=lambda: False):
    sent = []
    calls = Calls(preprocess=lambda inputs: {"pre": inputs}, prefill=lambda pre: {"handle": pre},
                  decode=lambda handle: iter([d.to_arrays() for d in deltas]), outputs=lambda resp: resp,
                  send=lambda out, final: sent.append((out, final)), cancelled=cancelled)
    return calls, sent


def test_relay_streams_renamed_outputs_and_ends_on_the_final_one():
    deltas = [TokenDelta("r", [1], "a", "", 2, 1, 0), TokenDelta("r", [2], "b", "stop", 2, 2, 0)]
    calls, sent = _calls(deltas)
    assert relay({}, calls, _Cancel()) == "finished"
    assert [f for _, f in sent] == [False, True]
    assert sent[0][0]["text_output"].tolist() == [b"a"] and sent[1][0]["finish_reason"].tolist() == [b"stop"]


def test_relay_on_cancellation_tells_decode_once_and_sends_nothing_more(monkeypatch):
    import baton.backends.stages.front as front

    monkeypatch.setattr(front, "CANCEL_POLL_S", 0.0)
    deltas = [TokenDelta("r9", [i], "x", "", 2, i + 1, 0) for i in range(5)] + [TokenDelta("r9", [], "", "cancelled", 2, 5, 0)]
    asked = []
    calls, sent = _calls(deltas, cancelled=lambda: asked.append(1) or len(asked) >= 2)
    cancel = _Cancel()
    assert relay({}, calls, cancel) == "cancelled"
    assert cancel.sent == ["r9"] and len(sent) == 1          # the first delta went out; none after the ask


def test_relay_raises_decodes_in_band_error_and_a_stream_without_an_end():
    calls, sent = _calls([TokenDelta("r", [1], "a", "", 2, 1, 0), error_delta("r", "worker died", unavailable=True)])
    with pytest.raises(FrontError, match="worker died") as e:
        relay({}, calls, _Cancel())
    assert e.value.code == "unavailable" and len(sent) == 1
    calls, _ = _calls([TokenDelta("r", [1], "a", "", 2, 1, 0)])
    with pytest.raises(FrontError, match="without a final response"):
        relay({}, calls, _Cancel())


def test_relay_cuts_a_request_past_its_deadline_and_says_which_limit(monkeypatch):
    import baton.backends.stages.front as front

    monkeypatch.setattr(front, "CANCEL_POLL_S", 0.0)
    deltas = [TokenDelta("r7", [i], "x", "", 2, i + 1, 0) for i in range(3)] + [TokenDelta("r7", [], "", "cancelled", 2, 3, 0)]
    calls, sent = _calls(deltas)
    cancel = _Cancel()
    with pytest.raises(FrontError, match="request_timeout_s") as e:
        relay({}, calls, cancel, timeout_s=1e-9)
    assert e.value.code == "unavailable" and cancel.sent == ["r7"] and sent == []
    calls, sent = _calls(deltas[:2] + [TokenDelta("r7", [9], "y", "length", 2, 3, 0)])
    assert relay({}, calls, cancel, timeout_s=60) == "finished" and len(sent) == 3


def test_relay_without_stream_sends_one_response_with_every_delta_merged():
    deltas = [TokenDelta("r", [1], "ab", "", 2, 1, 0, [-0.5]), TokenDelta("r", [2, 3], "é", "", 2, 3, 1, [-1.0, -2.0]),
              TokenDelta("r", [4], "!", "stop", 2, 4, 1, [-3.0])]
    calls, sent = _calls(deltas)
    assert relay({}, calls, _Cancel(), stream=False) == "finished"
    assert len(sent) == 1 and sent[0][1] is True
    out = sent[0][0]
    assert out["token_ids"].tolist() == [1, 2, 3, 4] and out["logprobs"].tolist() == [-0.5, -1.0, -2.0, -3.0]
    assert out["text_output"][0].decode() == "abé!" and out["finish_reason"].tolist() == [b"stop"]
    assert out["completion_tokens"].tolist() == [4] and out["cached_tokens"].tolist() == [1]


def test_request_timer_gives_one_observation_per_histogram():
    from baton.backends.stages.metrics import FRONT, RequestTimer

    t = RequestTimer(10.0)
    assert t.observations() == {}                         # nothing streamed: nothing observed
    t.prefilled(10.04, 0.03)                              # prefill computed 30 ms of the 40
    for now, n in ((10.05, 1), (10.10, 2), (10.25, 3)):
        t.response(n, 7, now)
    obs = t.observations()
    assert set(obs) == {n for n, d in FRONT.items() if d[0] == "histogram"}
    assert obs["baton:request_queue_time_seconds"] == pytest.approx([0.01])
    assert obs["baton:inter_token_latency_seconds"] == pytest.approx([0.05 / 2, 0.15 / 3])
    assert obs["baton:time_to_first_token_seconds"] == pytest.approx([0.05])
    assert obs["baton:e2e_request_latency_seconds"] == pytest.approx([0.25])
    assert obs["baton:time_per_output_token_seconds"] == pytest.approx([0.2 / 5])
    assert obs["baton:request_prompt_tokens"] == [7] and obs["baton:request_generation_tokens"] == [6]


def test_loopback_calls_end_at_their_deadline_when_a_stage_hangs():
    """A stage that never answers: the front's call ends with an "unavailable" FrontError at the
    deadline (request_timeout_s), instead of holding its request thread for ever."""
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    import grpc
    from tritonclient.grpc import service_pb2_grpc

    from baton.backends.stages.loopback import Loopback

    release = threading.Event()

    class Hung(service_pb2_grpc.GRPCInferenceServiceServicer):
        def ModelInfer(self, request, context):  # noqa: N802, ANN001, ANN201
            release.wait(30)
            context.abort(grpc.StatusCode.INTERNAL, "too late")

    server = grpc.server(ThreadPoolExecutor(2))
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(Hung(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        t = time.monotonic()
        with pytest.raises(FrontError) as e:
            Loopback(f"127.0.0.1:{port}", timeout_s=0.3).call("prefill", {"x": np.zeros(1, np.int64)}, [])
        assert e.value.code == "unavailable" and time.monotonic() - t < 5
    finally:
        release.set()
        server.stop(0)
