""" The one exception every layer raises for a problem with the user's input. """

__all__ = ['UserError', 'yaml_problem']


class UserError(Exception):
    """ A problem with the user's config, data or files: the commands report it as one clear line on
    stderr and exit with code 2 (no traceback). Library functions raise it; they never print it. """


def yaml_problem(e: Exception) -> str:
    """ A YAML parse error as one line: '(line L, column C): problem' (PyYAML's own text spans several lines,
    with a caret). """
    mark = getattr(e, 'problem_mark', None)
    where = f' (line {mark.line + 1}, column {mark.column + 1})' if mark is not None else ''
    return f'{where}: {getattr(e, "problem", None) or " ".join(str(e).split())}'
