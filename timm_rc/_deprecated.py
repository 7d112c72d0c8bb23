""" Names that moved in timm_rc 0.3.0, kept importable from their old modules for one release.

`alias(module_name, names)` returns a module-level `__getattr__` for an old module: `names` maps an old name
to its new module, or is a sequence of new modules searched in order for any public name. The new module
is imported on first use (through importlib, so that no library module imports a command), a
DeprecationWarning names the new place, and the value is kept in the old module (one warning per name).
"""
import importlib
import sys
import warnings
from typing import Callable, Dict, Sequence, Union

__all__ = ['alias']


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
        warnings.warn(f'{module_name}.{name} moved to {found[0]}.{name} (timm_rc 0.3.0); the old name goes in 0.4.0',
                      DeprecationWarning, stacklevel=2)
        setattr(sys.modules[module_name], name, value)
        return value
    return __getattr__
