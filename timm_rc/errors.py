""" The one exception every layer raises for a problem with the user's input. """

__all__ = ['UserError']


class UserError(Exception):
    """ A problem with the user's config, data or files: the commands report it as one clear line on
    stderr and exit with code 2 (no traceback). Library functions raise it; they never print it. """
