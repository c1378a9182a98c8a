"""Triton-language kernels behind the ops in kernels/. Imported only for CUDA tensors (and by the
tests, which run them on CPU under TRITON_INTERPRET=1 against the torch references)."""
