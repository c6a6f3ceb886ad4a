"""The one exception type for mistakes a user can make."""


class BehaviorLensError(ValueError):
    """Bad input: the message names what is wrong and where (family, pair, slot, file).

    The CLI prints it on one line and exits with status 2, without a traceback.
    """
