"""prefill: thin adapter over baton.backends.stages.prefill.PrefillStage (requests of one execute
are prefilled together)."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.serving.config import NodeConfig
from baton.backends.stages.common import core_share, execute_batch, node_engine
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
        out = execute_batch(pb_utils, self.node, "prefill", requests, self.stage.run, (EmbeddingsGone,))
        self.metrics.update(self.stage.metrics.take())
        return out

    def finalize(self):
        self.metrics.close()
