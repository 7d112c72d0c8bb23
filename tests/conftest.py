""" Fixtures shared by the test modules. """
import os

import pytest


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """ A finished 1-epoch run of rc4_cifar at width 4 on a tiny parquet dataset, trained the way people do:
    from its project folder, with relative paths. (root, run folder, summary); one per test module. """
    from test_train import TINY, make_parquet, run
    root = tmp_path_factory.mktemp('project')
    make_parquet(root / 'data')
    here = os.getcwd()
    os.chdir(root)
    try:
        summary = run(['--data_dir', 'data', '--epochs', '1', '--output_dir', 'runs/tiny/seed0', *TINY])
    finally:
        os.chdir(here)
    return root, root / 'runs' / 'tiny' / 'seed0', summary
