"""postprocess: shapes each streamed decode response into the user-facing outputs."""

import triton_python_backend_utils as pb_utils

from baton.backends.stages.postprocess import RENAME


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            out.append(pb_utils.InferenceResponse([
                pb_utils.Tensor(dst, pb_utils.get_input_tensor_by_name(r, src).as_numpy())
                for src, dst in RENAME.items()]))
        return out
