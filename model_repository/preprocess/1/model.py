"""preprocess: thin adapter over baton.backends.stages.preprocess.Preprocessor."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.engine.errors import InvalidRequestError
from baton.backends.serving.config import NodeConfig, pin_to
from baton.backends.serving.tensors import SCALARS, STRINGS
from baton.backends.stages.preprocess import Preprocessor

NAMES = [n for n, _ in STRINGS] + [n for n, _ in SCALARS]


class TritonPythonModel:
    def initialize(self, args):
        node = self.node = NodeConfig.load(NodeConfig.path_in(args["model_config"]))
        pin_to(node.serving.front_cpus)
        self.pre = Preprocessor(node.engine.model, node.engine.max_model_len, node.max_tokens_limit,
                                loras=node.engine.lora_modules)

    def execute(self, requests):
        out = []
        for r in requests:
            why = self.node.stage_call_refused(r.parameters(), "preprocess")
            if why:                                   # a client calling the stage directly
                out.append(pb_utils.InferenceResponse(error=_invalid(why)))
                continue
            inputs = {}
            for name in NAMES:
                t = pb_utils.get_input_tensor_by_name(r, name)
                if t is not None:
                    inputs[name] = t.as_numpy()
            try:
                msg = self.pre(inputs)
            except InvalidRequestError as e:
                out.append(pb_utils.InferenceResponse(error=_invalid(str(e))))
                continue
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(n, a) for n, a in msg.to_arrays().items()]))
        return out


def _invalid(message):
    try:
        return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)
    except (AttributeError, TypeError):
        return pb_utils.TritonError(message)
