"""postprocess: shapes each streamed decode response into the user-facing outputs."""

import triton_python_backend_utils as pb_utils  # pyright: ignore[reportMissingImports] (the Python backend provides it)

from baton.backends.stages.postprocess import RENAME


class TritonPythonModel:
    def execute(self, requests):
        out = []
        for r in requests:
            got = {t.name(): t for t in r.inputs()}    # one pass (get_input_tensor_by_name rescans per name)
            out.append(pb_utils.InferenceResponse([pb_utils.Tensor(dst, got[src].as_numpy())
                                                   for src, dst in RENAME.items()]))
        return out
