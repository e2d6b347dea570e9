"""The one error type for user mistakes; the CLI prints its message on one line, without a traceback."""


class HomeLLMError(Exception):
    """A mistake the user can fix: the message names the file, field or value and says what to do."""
