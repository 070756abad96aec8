class UserError(Exception):
    """A problem with what the user asked for or gave us (bad flag, missing file, no GPU).

    The CLI prints it as one line and exits non-zero, without a traceback.
    """
