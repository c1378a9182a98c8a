"""llm (profile single_node): the decoupled front that relays preprocess -> prefill -> decode (calls on
the node's own gRPC port, stages/loopback.py) and sees the client's cancellation (stages/front.py)."""

import json
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.cluster.nodes import NodeCalls
from baton.backends.runtime import configure_process
from baton.backends.serving.config import DRAINING, NodeConfig, pin_to
from baton.backends.serving.tensors import HANDLE, PREFILL_REQUEST, STREAM
from baton.backends.stages.cancel import CancelSender, CloseStream
from baton.backends.stages.front import Admission, Calls, FrontError, check_parameters, relay
from baton.backends.stages.loopback import Loopback
from baton.backends.stages.metrics import FRONT, RequestTimer, TritonMetrics

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        configure_process()
        node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        pin_to(node.serving.front_cpus)
        # served as llm_trtllm: TensorRT-LLM's shapes, a batch dimension (of 1) on every tensor
        self.batched = json.loads(args["model_config"]).get("max_batch_size", 0) > 0
        self.cancel = CancelSender(node.run_dir)
        self.stages = Loopback(node.grpc_address, node.serving.request_timeout_s, node.stage_key)  # not BLS: loopback.py says why
        self.router = None
        if node.name_service:                 # pd_router: prefill and decode run on the nodes it picks
            from baton.backends.cluster.router import Router

            self.router = Router(node.name_service, node.cluster, node.serving.request_timeout_s,
                                 node.serving.tier_weights, node.stage_key)
        self.limit = Admission(node.serving.max_pending_requests,
                               f"{node.run_dir}/front-{args['model_instance_name']}.inflight")
        self.draining = Path(node.run_dir) / DRAINING
        self.timeout_s = node.serving.request_timeout_s
        # EPD: images go through the encode model before prefill, this node's or an encode server's
        self.encoder = None
        if node.encode_service:               # encode servers found in the name service
            from baton.backends.cluster.encoders import EncodeServers

            self.encoder = EncodeServers(node.encode_service, node.cluster, node.serving.request_timeout_s, node.stage_key)
        elif node.encode_stage:
            self.encoder = Loopback(node.serving.encode_address, node.serving.request_timeout_s, node.stage_key) \
                if node.serving.encode_address else self.stages
        self.metrics = TritonMetrics(pb_utils, FRONT, {"model": args["model_name"], "version": args["model_version"]})
        # one thread per request in flight: a streaming call blocks its thread
        self.pool = ThreadPoolExecutor(max_workers=node.serving.max_pending_requests, thread_name_prefix="baton-front")

    def execute(self, requests):
        for r in requests:
            if self.draining.exists():            # one stat a request: the launcher is shutting down
                _fail(r.get_response_sender(), "server is shutting down: it admits no new requests",
                      pb_utils.TritonError.UNAVAILABLE)
                continue
            busy = self.limit.enter()
            if busy:
                _fail(r.get_response_sender(), busy, pb_utils.TritonError.UNAVAILABLE)
            else:
                self.pool.submit(self._serve_counted, r)
        return None

    def _serve_counted(self, r):
        timer = RequestTimer(time.monotonic())
        try:
            self._serve(r, timer)
        finally:
            self.limit.leave()
        # after leave(): the metric updates are IPC calls, and the request is done for its client
        # (a slot held through them refused the next wave's requests as "server busy")
        cluster = self.router or (self.encoder if isinstance(self.encoder, NodeCalls) else None)
        self.metrics.update(timer.observations() | (cluster.metrics() if cluster else {}))

    def _serve(self, r, timer):
        sender = r.get_response_sender()

        def send(outputs, final):
            tensors = [pb_utils.Tensor(n, a[None] if self.batched else a) for n, a in outputs.items()] if outputs else []
            sender.send(pb_utils.InferenceResponse(tensors), flags=FINAL if final else 0)
            if outputs:
                timer.response(len(outputs["token_ids"]), int(outputs["prompt_tokens"][0]), time.monotonic())

        stages, router, cancel = self.stages, self.router, self.cancel
        def prefilled(handle):                   # queue time: arrival to prefill starting on it
            timer.prefilled(time.monotonic(), float(handle["prefill_seconds"].reshape(-1)[0]))
            return handle

        calls = Calls(preprocess=lambda t: stages.call("preprocess", t, _names(PREFILL_REQUEST)),
                      prefill=lambda t: prefilled(stages.call("prefill", t, _names(HANDLE))),
                      decode=lambda t: stages.stream("decode", t, _names(STREAM)),
                      outputs=lambda resp: resp,
                      send=send, cancelled=r.is_cancelled,
                      encode=(lambda t: self.encoder.call("encode", t, _names(PREFILL_REQUEST))) if self.encoder else None)
        if router is not None:
            cancel = CloseStream()

            def decode(t):
                cancel.stream = router.decode(t, _names(STREAM))
                return cancel.stream

            calls.prefill, calls.decode = (lambda t: prefilled(router.prefill(t, _names(HANDLE)))), decode
        try:
            check_parameters(json.loads(r.parameters() or "{}"))
            inputs = {t.name(): t.as_numpy() for t in r.inputs()}
            if self.batched:
                inputs = _unbatched(inputs)
            stream = inputs.pop("stream", None)      # the front's own input (one merged response if false)
            stream = True if stream is None else bool(stream.reshape(-1)[0])
            if relay(inputs, calls, cancel, self.timeout_s, stream) == "cancelled":
                _close(sender)
        except FrontError as e:
            _fail(sender, str(e), _code(e.code))
        except Exception as e:                # a fault here is the server's, not the client's
            _fail(sender, f"llm front: {e!r}", pb_utils.TritonError.INTERNAL)

    def finalize(self):
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.router is not None:
            self.router.close()
        if self.encoder is not None and self.encoder is not self.stages:
            self.encoder.close()
        self.stages.close()
        self.metrics.close()


def _unbatched(inputs):
    """TensorRT-LLM's [1, ...] inputs as the stages take them ([...]); its UINT64 seed as INT64."""
    out = {n: a[0] for n, a in inputs.items()}
    if "seed" in out:
        out["seed"] = out["seed"].astype(np.int64)
    return out


def _names(specs):
    return [n for n, _, _ in specs]


def _code(code):
    """A stage's Triton error code, or decode's in-band reason as one (pb_utils.TritonError exists
    only once the stub runs, not at import)."""
    if code == "unavailable":
        return pb_utils.TritonError.UNAVAILABLE
    if code == "invalid":
        return pb_utils.TritonError.INVALID_ARG
    return pb_utils.TritonError.INTERNAL if code == "error" or code is None else code


def _fail(sender, message, code):
    try:
        sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message, code)), flags=FINAL)
    except Exception as e:                    # the client is gone
        print(f"baton llm front: could not send the error {message!r}: {e!r}", file=sys.stderr, flush=True)


def _close(sender):
    try:
        sender.send(flags=FINAL)
    except Exception:                         # already closed by the backend on cancellation
        pass
