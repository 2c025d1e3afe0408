class StepError(Exception):
    """Bad input or environment: the CLI prints the message as one line, with no traceback.

    The message names the file (or setting) and the reason, e.g. `data/cat/03.jpg: truncated JPEG data`.
    """
