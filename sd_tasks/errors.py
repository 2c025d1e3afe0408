class StepError(Exception):
    """Bad input or environment: the CLI prints the message as one line, with no traceback.

    The message names the file (or setting) and the reason, e.g. `data/cat/03.jpg: truncated JPEG data`.
    """


class IncompleteFolder(Exception):
    """An output folder that is not whole (its writer was stopped, or it changed while it was read): one line, like
    a StepError, but running the step again can help (its writer's retry, or a reread), so the exit code is 1."""
