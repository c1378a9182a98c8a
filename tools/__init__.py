"""Training baton-tiny and writing checkpoints: never imported by serving (needs the `train` extra)."""

if __name__ != "baton.tools":   # one name per module: `import tools` from the repository root would load a second copy
    raise ImportError(f"import this package as baton.tools, not {__name__}")
