"""Errors a client caused: the message names the offending field."""


class InvalidRequestError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
