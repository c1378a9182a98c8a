"""The OpenAI-compatible gateway (`baton gateway`): app.py serves it, protocol.py validates requests."""
