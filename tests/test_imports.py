""" The package's shape, read from its source with `ast` (nothing is imported): no import circle, no
module that imports another module's private names, commands above the library and apart from each
other, and no printing in the library.

Layers: the commands are `timm_rc.cli.*` (one per `python -m timm_rc <verb>`, sharing `cli.common`) and the
doors, `timm_rc.__main__` and any `__main__` of a subpackage (`python -m timm_rc.train`); everything else is the library, which never imports a command, in subpackages by concern
(`LAYERS`), each importing only its own layer and those below. Modules that moved keep working from their old
paths through `timm_rc._deprecated` (a finder and importlib at first use), so no file is left at those paths.
"""
import ast
from pathlib import Path
from typing import Dict, List, Set, Tuple

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'timm_rc'
# the library's subpackages by concern, bottom first: a module imports its own layer and those below it only
LAYERS = [
    {'timm_rc.errors', 'timm_rc.layers'},
    {'timm_rc.models', 'timm_rc.conversion'},
    {'timm_rc.quantize', 'timm_rc.data', 'timm_rc.runs'},
    {'timm_rc.evaluation', 'timm_rc.reports'},
    {'timm_rc.train', 'timm_rc.deploy'},
    {'timm_rc.cli', 'timm_rc.__main__'},
]
# library modules allowed to print: the trainer's own warnings (its lock and checkpoints)
MAY_PRINT = {'timm_rc.runs.checkpoints', 'timm_rc.train.lock', 'timm_rc.train.loop'}


def modules() -> Dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob('*.py')):
        parts = path.relative_to(PACKAGE.parent).with_suffix('').parts
        name = '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)
        out[name] = path
    return out


def _resolve(module: str, is_package: bool, level: int, target: str) -> str:
    if level == 0:
        return target
    base = module.split('.') if is_package else module.split('.')[:-1]
    base = base[:len(base) - (level - 1)]
    return '.'.join(base + ([target] if target else []))


def imports(mods: Dict[str, Path]) -> Tuple[Dict[str, Set[str]], List[str]]:
    """ ({module: timm_rc modules it imports, anywhere in the file}, [private-name imports]). """
    graph: Dict[str, Set[str]] = {m: set() for m in mods}
    private = []
    for name, path in mods.items():
        is_package = path.name == '__init__.py'
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    if alias.name.split('.')[0] == 'timm_rc':
                        target = alias.name
                        while target not in mods:
                            target = target.rsplit('.', 1)[0]
                        graph[name].add(target)
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(name, is_package, node.level, node.module or '')
                if base.split('.')[0] != 'timm_rc':
                    continue
                for alias in node.names:
                    sub = f'{base}.{alias.name}'
                    if sub in mods:  # `from . import models`: the submodule
                        graph[name].add(sub)
                        continue
                    graph[name].add(base)
                    if alias.name.startswith('_') and not alias.name.startswith('__'):
                        private.append(f'{name} imports {alias.name} from {base}')
    for m in graph:
        graph[m].discard(m)
    return graph, private


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """ Every strongly connected group of more than one module (Tarjan). """
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in graph:
        if v not in index:
            visit(v)
    return out


MODS = modules()
GRAPH, PRIVATE = imports(MODS)


def test_the_graph_sees_the_package():
    # the reader finds the modules and their edges (a broken reader would pass every rule below)
    assert {'timm_rc.cli.eval', 'timm_rc.evaluation', 'timm_rc.runs', 'timm_rc.quantize.files'} <= set(MODS)
    assert 'timm_rc.evaluation' in GRAPH['timm_rc.cli.eval']
    assert layer('timm_rc.runs.source') == 2 and layer('timm_rc.cli.eval') == 5 and layer('timm_rc._deprecated') is None
    assert 'timm_rc.runs.source' in GRAPH['timm_rc.evaluation.evaluate']
    assert 'timm_rc.errors' in GRAPH['timm_rc.models.create']
    assert cycles({'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}) == [['a', 'b', 'c']]


def test_no_import_circle():
    assert cycles(GRAPH) == []


def test_no_module_imports_another_modules_private_names():
    assert PRIVATE == []


def is_door(module: str) -> bool:
    """ A `python -m` entry point: the package's `__main__` or a subpackage's, above the library. """
    return module.endswith('.__main__')


def layer(module: str):
    """ The index in LAYERS of the subpackage `module` belongs to (None: the package itself, _deprecated). """
    if is_door(module):
        return len(LAYERS) - 1
    for i, group in enumerate(LAYERS):
        if any(module == g or module.startswith(g + '.') for g in group):
            return i
    return None


def test_every_module_has_a_layer_and_imports_none_above_it():
    top = {m for m in MODS if layer(m) is None}
    assert top == {'timm_rc', 'timm_rc._deprecated'}  # the package's front and the old paths; nothing else
    upward = [f'{m} -> {t}' for m in MODS if layer(m) is not None for t in GRAPH[m]
              if layer(t) is not None and layer(t) > layer(m)]
    assert upward == []


def test_the_top_level_holds_about_ten_names():
    names = sorted(p.stem if p.is_file() else p.name for p in PACKAGE.iterdir()
                   if not p.name.startswith(('_', '.')) and (p.suffix == '.py' or (p / '__init__.py').is_file()))
    assert names == ['cli', 'conversion', 'data', 'deploy', 'errors', 'evaluation', 'layers', 'models', 'quantize',
                     'reports', 'runs', 'train']


def test_the_library_never_imports_a_command():
    # the commands and the door that dispatches to them
    commands = {m for m in MODS if m.startswith('timm_rc.cli') or is_door(m)}
    assert {m for m in commands if is_door(m)} == {'timm_rc.__main__', 'timm_rc.train.__main__'}
    offenders = [f'{m} -> {t}' for m in MODS if m not in commands for t in GRAPH[m] if t in commands]
    assert offenders == []


def test_no_command_imports_another_command():
    offenders = []
    for m in MODS:
        if m.startswith('timm_rc.cli.') and m != 'timm_rc.cli.common':
            offenders += [f'{m} -> {t}' for t in GRAPH[m] if t.startswith('timm_rc.cli.') and t != 'timm_rc.cli.common']
    assert offenders == []


@pytest.mark.parametrize('module', sorted(m for m in MODS if not m.startswith('timm_rc.cli') and m not in MAY_PRINT
                                          and not is_door(m)))
def test_library_modules_do_not_print(module):
    calls = [node.lineno for node in ast.walk(ast.parse(MODS[module].read_text()))
             if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == 'print']
    assert calls == [], f'{module} prints at lines {calls}: return, raise UserError or take a callback'


def test_no_package_file_is_ignored_by_git():
    """ .gitignore's run-output patterns once matched timm_rc/runs/ and kept its __init__.py out of git: a clean
    clone could not import timm_rc. """
    import shutil
    import subprocess
    from pathlib import Path
    repo = Path(__file__).resolve().parents[1]
    if shutil.which('git') is None or not (repo / '.git').exists():
        pytest.skip('not a git checkout')
    files = [str(p.relative_to(repo)) for p in (repo / 'timm_rc').rglob('*.py')]
    ignored = subprocess.run(['git', 'check-ignore', '--no-index', *files], cwd=repo, capture_output=True, text=True)
    assert ignored.stdout == '', ignored.stdout
