""" Names that moved in timm_rc 0.3.0, kept importable from their old modules for one release.

A module lists its old names as {name: 'new.module'}; `alias(module_name, names)` returns a module-level
`__getattr__` that imports the new module on first use (through importlib, so that no library module
imports a command) and warns with a DeprecationWarning naming the new place.
"""
import importlib
import warnings
from typing import Callable, Dict

__all__ = ['alias']


def alias(module_name: str, names: Dict[str, str]) -> Callable[[str], object]:
    def __getattr__(name: str):
        if name not in names:
            raise AttributeError(f'module {module_name!r} has no attribute {name!r}')
        new = names[name]
        warnings.warn(f'{module_name}.{name} moved to {new}.{name} (timm_rc 0.3.0); the old name goes in 0.4.0',
                      DeprecationWarning, stacklevel=2)
        return getattr(importlib.import_module(new), name)
    return __getattr__
