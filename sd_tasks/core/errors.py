class StepError(Exception):
    """Bad input or environment: the CLI prints the message as one line, with no traceback.

    The message names the file (or setting) and the reason, e.g. `data/cat/03.jpg: truncated JPEG data`.
    """


class IncompleteFolder(Exception):
    """An output folder that is not whole (its writer was stopped, or it changed while it was read): one line, like
    a StepError, but running the step again can help (its writer's retry, or a reread), so the exit code is 1."""


class Unavailable(Exception):
    """A service or resource the step needs failed it (the tracking server or S3 is down, the disk is full): one line
    naming it and the reason, no traceback, exit code 1, since a retry once it is back can succeed."""
