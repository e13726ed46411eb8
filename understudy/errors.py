"""The one base class for errors caused by input (a file, a flag, a request field): the CLI prints their message
as one line and exits 2; the server turns them into 4xx. Anything else is a bug and keeps its traceback."""


class UnderstudyError(Exception):
    """Bad input: the message names the file or field at fault and what to do."""


class UserError(UnderstudyError):
    """A command-line argument is wrong."""
