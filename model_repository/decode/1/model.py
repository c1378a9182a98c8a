"""decode (decoupled): execute() hands each request to the decode worker process (its one
continuous-batching loop) and returns at once; the worker's TokenDelta messages stream back through
each request's response sender."""

import subprocess

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.serving.config import NodeConfig
from baton.backends.serving.tensors import HANDLE
from baton.backends.stages.cancel import cancel_address
from baton.backends.stages.decode_worker import DecodeProxy, worker_command
from baton.backends.stages.messages import KVHandle, error_delta
from baton.backends.stages.metrics import DECODE, TritonMetrics


class TritonSink:
    def __init__(self, request, request_id):
        self.request = request
        self.request_id = request_id
        self.sender = request.get_response_sender()

    def send(self, delta, final):
        tensors = [pb_utils.Tensor(n, a) for n, a in delta.to_arrays().items()]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb_utils.InferenceResponse(tensors), flags=flags)

    def error(self, message, unavailable=False):
        # in band, as the stream's last delta: an error response does not reach a BLS caller (the
        # llm front) in Triton 2.51's Python backend; the front turns this into a Triton error
        self.send(error_delta(self.request_id, message, unavailable), True)

    def cancelled(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        path = NodeConfig.path_in(args["model_config"])
        node = self.node = NodeConfig.load(path)
        address = f"ipc://{node.run_dir}/decode-{args['model_instance_name']}.sock"
        cmd = worker_command(address, path, cancel_address(node.run_dir, args["model_instance_name"]))
        self.metrics = TritonMetrics(pb_utils, DECODE, {"model": args["model_name"], "version": args["model_version"]})
        self.stage = DecodeProxy(address, lambda: subprocess.Popen(cmd), self.metrics.update)

    def execute(self, requests):
        for r in requests:
            why = self.node.stage_call_refused(r.parameters(), "decode")
            if why:                                   # a client calling the stage directly
                r.get_response_sender().send(pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(why, pb_utils.TritonError.INVALID_ARG)),
                    flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
                continue
            arrays = {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n, _, _ in HANDLE}
            handle = KVHandle.from_arrays(arrays)
            self.stage.submit(handle, TritonSink(r, handle.request_id))
        return None

    def finalize(self):
        self.stage.stop()
        try:
            self.stage.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.stage.proc.kill()
        self.metrics.close()
