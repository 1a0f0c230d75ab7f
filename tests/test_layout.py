"""docs/LAYOUT.md's rules, read from the source: imports point down the layers, no module imports
itself back through others, and the modes never import each other."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Top to bottom (docs/LAYOUT.md): a package may import only packages of a later row.
LAYERS = (
    ('allflax.modes',),
    ('allflax.aot', 'allflax.deploy'),
    ('allflax.training',),
    ('allflax.evaluation',),
    ('allflax.models',),
    ('allflax.data',),
    ('allflax.runtime', 'allflax.sharding', 'allflax.files'),
    ('allflax.cpu', 'allflax.tpu'),
)
RANK = {package: rank for rank, row in enumerate(LAYERS) for package in row}


def _modules() -> dict[str, str]:
    """Dotted name -> path of every module of the package."""
    found = {}
    for folder, _, names in os.walk(os.path.join(ROOT, 'allflax')):
        for name in names:
            if name.endswith('.py'):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, '.').removesuffix('.__init__')
                found[dotted] = path
    return found


MODULES = _modules()


def _imports(path: str) -> set[str]:
    """The allflax modules a file imports, at any depth of its code (a function's imports count)."""
    targets = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith('allflax'):
            for alias in node.names:
                name = f'{node.module}.{alias.name}'
                targets.add(name if name in MODULES else node.module)
        elif isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name.startswith('allflax'))
    return targets


GRAPH = {module: _imports(path) for module, path in MODULES.items()}


def _package(module: str) -> str:
    return '.'.join(module.split('.')[:2])


def test_every_package_has_a_layer():
    assert {_package(module) for module in MODULES if module != 'allflax'} == set(RANK)


def test_imports_point_down_the_layers():
    upward = [f'{module} imports {target}' for module, targets in GRAPH.items() for target in targets
              if module != 'allflax' and _package(target) != _package(module)
              and RANK[_package(target)] <= RANK[_package(module)]]
    assert not upward, 'imports against docs/LAYOUT.md: ' + '; '.join(sorted(upward))


def test_modes_never_import_each_other():
    crossing = [f'{module} imports {target}' for module, targets in GRAPH.items() for target in targets
                if _package(module) == 'allflax.modes' == _package(target) and target != 'allflax.modes']
    assert not crossing, crossing


def test_no_import_cycles():
    state = {}

    def visit(module, trail):
        state[module] = 'open'
        for target in sorted(GRAPH.get(module, ())):
            if state.get(target) == 'open':
                pytest.fail('import cycle: ' + ' -> '.join(trail[trail.index(target):] + [target]))
            if target in GRAPH and target not in state:
                visit(target, trail + [target])
        state[module] = 'done'

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [module])


def test_the_checker_sees_a_planted_upward_import(tmp_path):
    """The rules can fail: a models module that imports a mode is caught."""
    planted = tmp_path / 'planted.py'
    planted.write_text('from allflax.modes import evaluate\n')
    targets = _imports(str(planted))
    assert targets == {'allflax.modes.evaluate'}
    assert RANK[_package('allflax.modes.evaluate')] < RANK['allflax.models']
