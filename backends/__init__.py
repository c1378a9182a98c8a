"""The engine library the Triton models import (engine/, models/, kv/, loader/, stages/, serving/)."""

if __name__ != "baton.backends":   # one name per module: `import backends` from the repository root would load a second copy
    raise ImportError(f"import this package as baton.backends, not {__name__}")
