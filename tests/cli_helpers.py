""" Calling a command's main() in-process the way the tests of every command do. """
import json

import pytest


def json_result(main, argv, capsys):
    """ main(argv + --json): the printed JSON equals the returned result; returns the printed one. """
    capsys.readouterr()
    result = main([*argv, '--json'])
    printed = json.loads(capsys.readouterr().out)
    assert printed == json.loads(json.dumps(result))
    return printed


def exits_2(main, argv, capsys):
    """ main(argv) stops with exit code 2 and one line on stderr, no traceback; returns that line. """
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and 'Traceback' not in err and err.count('\n') == 1, err
    return err
