"""draft: thin adapter over baton.backends.stages.draft.DraftStage (decode calls it once per step)."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.serving.config import NodeConfig
from baton.backends.serving.tensors import DRAFT_CALL
from baton.backends.stages.draft import DraftStage
from baton.backends.stages.messages import DraftCall
from baton.backends.stages.metrics import DRAFT, TritonMetrics


class TritonPythonModel:
    def initialize(self, args):
        self.node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        self.stage = DraftStage(self.node)
        self.metrics = TritonMetrics(pb_utils, DRAFT, {"model": args["model_name"], "version": args["model_version"]})

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
                reply = self.stage.run(call)
            except Exception as e:                   # noqa: BLE001 - a server fault, reported as one
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"draft failed: {e}",
                                                                                 pb_utils.TritonError.INTERNAL)))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in reply.to_arrays(call.k).items()]))
            if (m := self.stage.metrics(force=bool(call.release))) is not None:
                self.metrics.update(m)
        return out

    def finalize(self):
        self.metrics.close()
        self.stage.close()
