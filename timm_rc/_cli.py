""" What every `python -m timm_rc.<command>` does around its main(). """
import os
import sys


def run(main) -> None:
    """ Run a command's main(); its output piped into a reader that stops early (`| head`) ends quietly,
    as for any Unix tool, instead of with a BrokenPipeError traceback. """
    try:
        code = main()
        sys.stdout.flush()
    except BrokenPipeError:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())  # Python flushes stdout again at exit
        sys.exit(1)
    if isinstance(code, int) and not isinstance(code, bool):  # the sweep runner returns its exit code
        sys.exit(code)
