"""The one error type for user mistakes; the CLI prints its message on one line, without a traceback."""

import shlex


class HomeLLMError(Exception):
    """A mistake the user can fix: the message names the file, field or value and says what to do.

    `everywhere`: every process of a torchrun run meets this same error at once (the data, the averaged loss), so
    rank 0 says it for all of them."""

    def __init__(self, message: str, everywhere: bool = False):
        super().__init__(message)
        self.everywhere = everywhere


def typed(path: object) -> str:
    """A path as it must be typed in a command a message suggests: quoted where the shell would split or expand it
    (`homellm eval 'runs/my run'`), so the command pastes whole."""
    return shlex.quote(str(path))


def quoted(text: str) -> str:
    r"""A model's output shown in quotes with its backslashes as written (repr() doubled them, and `-\frac{7}{3}` read
    as `-\\frac{7}{3}`, not what the model wrote), its line breaks as \n and every other character a terminal would
    not print as an escape: a tab is \x09, as \t would read as the start of \times or \text."""
    shown = {"\n": "\\n", "\r": "\\r", "\t": "\\x09"}
    return "'" + "".join(c if c.isprintable() else shown.get(c) or ascii(c)[1:-1] for c in text) + "'"
