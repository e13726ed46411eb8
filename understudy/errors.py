"""The one base class for errors the program expects (bad input, overload, a refused swap): the CLI prints their
message as one line and exits 2; the server answers with the HTTP status, OpenAI error type and code the
exception itself carries, so the web layer's error handlers import nothing from the domain. Anything else is a
bug and keeps its traceback."""

from __future__ import annotations


class UnderstudyError(Exception):
    """The message names the file or field at fault and what to do.

    The class attributes say what an HTTP client sees when one reaches a route. The default is a 500 that does not
    leak the message: subclasses raised on a request path (bad input, overload, draining) declare their own."""

    http_status: int = 500
    error_type: str = "server_error"  # OpenAI's error.type
    code: str | None = None  # OpenAI's error.code
    param: str | None = None  # the request field at fault
    retry_after_s: int | None = None  # sent as Retry-After
    expose: bool = False  # whether str(self) is shown to the client

    def public_message(self) -> str:
        return str(self) if self.expose else "internal server error"


class InputError(UnderstudyError):
    """A request's own input is at fault: 400 naming the field."""

    http_status = 400
    error_type = "invalid_request_error"
    expose = True

    def __init__(self, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.param = param
        if code is not None:
            self.code = code


class UserError(UnderstudyError):
    """A command-line argument is wrong."""
