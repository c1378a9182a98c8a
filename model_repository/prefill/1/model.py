"""prefill: thin adapter over baton.backends.stages.prefill.PrefillStage (requests of one execute
are prefilled together)."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.engine.errors import InvalidRequestError
from baton.backends.serving.config import NodeConfig
from baton.backends.serving.tensors import PREFILL_REQUEST
from baton.backends.stages.common import core_share, node_engine
from baton.backends.stages.messages import PrefillRequest
from baton.backends.stages.metrics import PREFILL, TritonMetrics
from baton.backends.stages.prefill import EmbeddingsGone, PrefillStage


class TritonPythonModel:
    def initialize(self, args):
        node = self.node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        self.stage = PrefillStage(node_engine(node, "prefill"), bytes.fromhex(node.handle_key), core_share(node, "prefill"),
                                  node.block_source, f"{node.run_dir}/prefill-{args['model_instance_name']}.load",
                                  node.embedding_store_client(), node.epd_host)
        self.metrics = TritonMetrics(pb_utils, PREFILL, {"model": args["model_name"], "version": args["model_version"]})

    def execute(self, requests):
        refused = [self.node.stage_call_refused(r.parameters(), "prefill") for r in requests]
        batch = [PrefillRequest.from_arrays({n: pb_utils.get_input_tensor_by_name(r, n).as_numpy()
                                             for n, _, _ in PREFILL_REQUEST}) for r, why in zip(requests, refused) if not why]
        results = iter(self.stage.run(batch) if batch else [])
        out = []
        for why in refused:
            if why:                                   # a client calling the stage directly
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(why, pb_utils.TritonError.INVALID_ARG)))
                continue
            res = next(results)
            if isinstance(res, Exception):
                code = pb_utils.TritonError.INVALID_ARG if isinstance(res, InvalidRequestError) else \
                    pb_utils.TritonError.UNAVAILABLE if isinstance(res, EmbeddingsGone) else pb_utils.TritonError.INTERNAL
                out.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(str(res), code)))
            else:
                out.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in res.to_arrays().items()]))
        self.metrics.update(self.stage.metrics.take())
        return out

    def finalize(self):
        self.metrics.close()
