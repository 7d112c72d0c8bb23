""" Names and modules that moved, kept working for one release with a DeprecationWarning naming the new place.

`alias(module_name, names)` returns a module-level `__getattr__` for a module that keeps old names: `names`
maps an old name to its new module, or is a sequence of new modules searched in order for any public name.

`MOVED` lists the modules that moved in timm_rc 0.3.0 (the layout by concern). No file is left at their old
paths: `install()` puts a finder on `sys.meta_path` that builds each old module on import (a DeprecationWarning
where it is imported), with every name of its new modules reachable through `alias` (and `import *`), and
`python -m OLD` runs the command that replaced it.
"""
import importlib
import importlib.abc
import importlib.util
import sys
import warnings
from typing import Callable, Dict, Optional, Sequence, Tuple, Union

__all__ = ['alias', 'MOVED', 'install']

REMOVAL = '0.4.0'

# old module -> (the modules its names now live in, searched in order; the command `python -m OLD` runs)
MOVED: Dict[str, Tuple[Tuple[str, ...], Optional[str]]] = {
    # the commands' old module paths (python -m timm_rc.<verb>)
    'timm_rc.compress': (('timm_rc.deploy.compression', 'timm_rc.quantize', 'timm_rc.cli.compress'), 'compress'),
    'timm_rc.convert': (('timm_rc.deploy.convert', 'timm_rc.cli.convert'), 'convert'),
    'timm_rc.eval': (('timm_rc.evaluation', 'timm_rc.runs.source', 'timm_rc.data', 'timm_rc.runs.folder', 'timm_rc.cli.eval'),
                     'eval'),
    'timm_rc.export': (('timm_rc.deploy.export', 'timm_rc.cli.export'), 'export'),
    'timm_rc.plots': (('timm_rc.reports.figures', 'timm_rc.cli.plots'), 'plots'),
    'timm_rc.results': (('timm_rc.reports.tables', 'timm_rc.cli.results'), 'results'),
    'timm_rc.sweep': (('timm_rc.train.sweeps', 'timm_rc.cli.sweep'), 'sweep'),
    'timm_rc.train.cli': (('timm_rc.cli.train',), 'train'),
    # library modules of 0.2.0 / 0.3.0.dev, now in the subpackage of their concern
    'timm_rc.create': (('timm_rc.models.create',), None),
    'timm_rc.config': (('timm_rc.runs.config',), None),
    'timm_rc.checkpoints': (('timm_rc.runs.checkpoints',), None),
    'timm_rc.loading': (('timm_rc.runs.source',), None),
    'timm_rc.recalibration': (('timm_rc.evaluation.recalibration',), None),
    'timm_rc.compression': (('timm_rc.deploy.compression',), None),
    'timm_rc.convert_weights': (('timm_rc.deploy.convert',), None),
    'timm_rc.distillation': (('timm_rc.train.distillation',), None),
    'timm_rc.sweep_runner': (('timm_rc.train.sweeps',), None),
    'timm_rc.tables': (('timm_rc.reports.tables',), None),
    'timm_rc.figures': (('timm_rc.reports.figures',), None),
    'timm_rc.formatting': (('timm_rc.reports.formatting',), None),
    'timm_rc.train.config': (('timm_rc.runs.config',), None),
    'timm_rc.train.data': (('timm_rc.data',), None),
    'timm_rc.train.checkpoint': (('timm_rc.runs.checkpoints',), None),
}


def _public(module) -> Sequence[str]:
    return getattr(module, '__all__', None) or [n for n in dir(module) if not n.startswith('_')]


def alias(module_name: str, names: Union[Dict[str, str], Sequence[str]]) -> Callable[[str], object]:
    def __getattr__(name: str):
        if isinstance(names, dict):
            found = [names[name]] if name in names else []
        else:
            modules = [importlib.import_module(m) for m in names] if not name.startswith('_') else []
            # where the name is public (its __all__) first, else any module that has it
            found = [m.__name__ for m in modules if name in _public(m)] + [m.__name__ for m in modules if hasattr(m, name)]
        if not found:
            raise AttributeError(f'module {module_name!r} has no attribute {name!r}')
        value = getattr(importlib.import_module(found[0]), name)
        warnings.warn(f'{module_name}.{name} moved to {found[0]}.{name} (timm_rc 0.3.0); the old name goes in '
                      f'{REMOVAL}', DeprecationWarning, stacklevel=2)
        setattr(sys.modules[module_name], name, value)
        return value
    return __getattr__


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.InspectLoader):
    """ Builds an old module of `MOVED`: an empty module whose names resolve through `alias`. """

    def find_spec(self, fullname, path=None, target=None):
        if fullname in MOVED:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        return None  # the default: an empty module

    def exec_module(self, module):
        """ The old module: one DeprecationWarning where it is imported (stacklevel 2 skips importlib's own frames)
        naming the new modules, whose public names it holds (`from OLD import *` gets them); any other name is
        reached through `alias`, with a warning naming its new place. """
        new, command = MOVED[module.__name__]
        warnings.warn(f'{module.__name__} moved in timm_rc 0.3.0: its names are in {", ".join(new)}; the old module '
                      f'goes in {REMOVAL}', DeprecationWarning, stacklevel=2)
        module.__doc__ = (f'{module.__name__} moved in timm_rc 0.3.0: its names are in {", ".join(new)} '
                          f'(reachable here until {REMOVAL}).')
        public = {}
        for m in reversed(new):  # the first module's name wins, as `alias` searches them
            mod = importlib.import_module(m)
            public.update({n: getattr(mod, n) for n in _public(mod) if hasattr(mod, n)})
        module.__dict__.update(public)
        module.__all__ = sorted(public)
        module.__getattr__ = alias(module.__name__, list(new))

    def get_source(self, fullname):
        return None

    def get_code(self, fullname):
        """ `python -m OLD`: a DeprecationWarning, then the command that replaced it. """
        new, command = MOVED[fullname]
        if command is None:
            raise ImportError(f'{fullname} is no command (it moved to {new[0]}); the commands are '
                              f'python -m timm_rc <command>', name=fullname)
        source = (f'import warnings\n'
                  f'warnings.warn("python -m {fullname} is python -m timm_rc {command} now; the old form goes in '
                  f'{REMOVAL}", DeprecationWarning)\n'
                  f'import sys\n'
                  f'from timm_rc.__main__ import main\n'
                  f'from timm_rc.cli.common import run\n'
                  f'sys.argv[0] = "python -m timm_rc {command}"\n'
                  f'run(lambda: main(["{command}", *sys.argv[1:]]))\n')
        return compile(source, f'<{fullname}>', 'exec')


def install() -> None:
    """ Put the finder of `MOVED` modules on `sys.meta_path` (once). """
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # before any finder that could find a stale file
