"""One class per Triton stage. The model.py files under model_repository/ only adapt Triton tensors
to these classes, which are importable and tested without a server."""
