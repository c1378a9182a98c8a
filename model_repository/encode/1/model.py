"""encode (EPD): thin adapter over baton.backends.stages.encode.EncodeStage (the vision tower; the
requests of one execute are encoded together)."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.loader import weight_store
from baton.backends.models.config import ModelConfig
from baton.backends.models.vision import VisionConfig, VisionTower
from baton.backends.multimodal.encoder import ImageEncoder, visual_weights
from baton.backends.multimodal.image import ImageProcessor
from baton.backends.runtime import configure_process, lower_priority
from baton.backends.serving.config import NodeConfig, pin_to
from baton.backends.stages.common import embedding_arena, execute_batch
from baton.backends.stages.encode import ENCODE_NICE, EncodeStage
from baton.backends.stages.metrics import ENCODE, TritonMetrics


class TritonPythonModel:
    def initialize(self, args):
        node = self.node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        # the encoder on cores of its own (EPD on one box): a thread each
        configure_process(pin_to(node.serving.encode_cpus) or node.engine.threads)
        lower_priority(ENCODE_NICE)
        model = node.engine.model
        tower = VisionTower(VisionConfig.from_hf_dict(ModelConfig.from_dir(model).vision_config),
                            visual_weights(weight_store.attach(node.weights)))
        processor = ImageProcessor.from_dir(model)
        cache = node.embedding_store_client()
        if node.serving.pd_role == "encode":  # an encode server: prefill servers read over the transfer engine
            cache = embedding_arena(node, tower, processor)
        encoder = ImageEncoder(tower, processor, cache)
        self.stage = EncodeStage(encoder, bytes.fromhex(node.handle_key))
        self.metrics = TritonMetrics(pb_utils, ENCODE, {"model": args["model_name"], "version": args["model_version"]})

    def execute(self, requests):
        out = execute_batch(pb_utils, self.node, "encode", requests, self.stage.run)
        self.metrics.update(self.stage.metrics.take())
        return out

    def finalize(self):
        self.metrics.close()
