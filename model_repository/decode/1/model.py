"""decode (decoupled): execute() hands each request to the stage's continuous-batching loop and
returns at once; the loop streams responses through the request's sender."""

import json
import shutil
import subprocess

import numpy as np
import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.serving.tensors import HANDLE
from baton.backends.stages.common import StageParams
from baton.backends.stages.decode_worker import DecodeProxy
from baton.backends.stages.handle import KVHandle
from baton.backends.stages.metrics import DECODE, TritonMetrics


class TritonSink:
    def __init__(self, request):
        self.request = request
        self.sender = request.get_response_sender()

    def send(self, out, final):
        tensors = [
            pb_utils.Tensor("d_token_ids", np.asarray(out["token_ids"], dtype=np.int64)),
            pb_utils.Tensor("d_text", np.array([out["text"].encode()], dtype=object)),
            pb_utils.Tensor("d_finish_reason", np.array([out["finish_reason"].encode()], dtype=object)),
            pb_utils.Tensor("d_prompt_tokens", np.array([out["prompt_tokens"]], dtype=np.int32)),
            pb_utils.Tensor("d_completion_tokens", np.array([out["completion_tokens"]], dtype=np.int32)),
            pb_utils.Tensor("d_cached_tokens", np.array([out["cached_tokens"]], dtype=np.int32)),
            pb_utils.Tensor("d_logprobs", np.asarray(out["logprobs"], dtype=np.float32)),
        ]
        flags = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL if final else 0
        self.sender.send(pb_utils.InferenceResponse(tensors), flags=flags)

    def error(self, message):
        self.sender.send(pb_utils.InferenceResponse(error=pb_utils.TritonError(message)),
                         flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def cancelled(self):
        return self.request.is_cancelled()


class TritonPythonModel:
    def initialize(self, args):
        # The loop runs on the main thread of a worker process (see decode_worker); this stub relays.
        params = StageParams.from_model_config(json.loads(args["model_config"]))
        address = f"ipc://{params.run_dir}/decode-{args['model_instance_name']}.sock"
        cmd = [shutil.which("python3") or "python3", "-P", "-m", "baton.backends.stages.decode_worker",
               "--address", address, "--params", json.dumps(params.__dict__)]
        self.metrics = TritonMetrics(pb_utils, DECODE, {"model": args["model_name"], "version": args["model_version"]})
        self.stage = DecodeProxy(address, lambda: subprocess.Popen(cmd), self.metrics.update)

    def execute(self, requests):
        for r in requests:
            arrays = {n: pb_utils.get_input_tensor_by_name(r, n).as_numpy() for n, _, _ in HANDLE}
            self.stage.submit(KVHandle.from_arrays(arrays), TritonSink(r))
        return None

    def finalize(self):
        self.stage.stop()
        self.stage.proc.wait(10)
        self.metrics.close()
