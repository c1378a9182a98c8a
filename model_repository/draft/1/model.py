"""draft: thin adapter over baton.backends.stages.draft.DraftStage (decode calls it once per step,
through Triton or, on the same node, over the stage's socket: stages/draft_channel.py)."""

import threading

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.serving.config import NodeConfig
from baton.backends.serving.tensors import DRAFT_CALL
from baton.backends.stages.draft import DraftStage
from baton.backends.stages.draft_channel import DraftChannelServer
from baton.backends.stages.messages import DraftCall
from baton.backends.stages.metrics import DRAFT, TritonMetrics


class TritonPythonModel:
    def initialize(self, args):
        self.node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        self.stage = DraftStage(self.node)
        self.metrics = TritonMetrics(pb_utils, DRAFT, {"model": args["model_name"], "version": args["model_version"]})
        self.metrics_lock = threading.Lock()
        address = self.node.draft_address
        self.channel = DraftChannelServer(address, self._answer) if address.startswith("ipc://") else None

    def _answer(self, arrays):
        call = DraftCall.from_arrays(arrays)
        reply, m = self.stage.answer(call)
        self._update(m)
        return reply.to_arrays(call.k)

    def _update(self, m):
        if m is not None:
            with self.metrics_lock:
                self.metrics.update(m)

    def execute(self, requests):
        out = []
        for r in requests:
            why = self.node.stage_call_refused(r.parameters(), "draft")
            try:
                if why:                              # a client calling the stage directly
                    raise ValueError(why)
                call = DraftCall.from_arrays({n: pb_utils.get_input_tensor_by_name(r, n).as_numpy()
                                              for n, _, _ in DRAFT_CALL})
            except ValueError as e:
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)))
                continue
            try:
                reply, m = self.stage.answer(call)
            except Exception as e:                   # noqa: BLE001 - a server fault, reported as one
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"draft failed: {e}",
                                                                                 pb_utils.TritonError.INTERNAL)))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in reply.to_arrays(call.k).items()]))
            self._update(m)
        return out

    def finalize(self):
        if self.channel is not None:
            self.channel.close()
        self.metrics.close()
        self.stage.close()
