"""The code's shape: library layers import downward only, at the top of each module; no
function over 80 lines in the library; no file over 400 lines, experiments included."""
import ast
import pathlib

import pytest

from tests.conftest import ROOT

PACKAGE = pathlib.Path(ROOT) / 'dynmoe_jax'
# Lowest first: a module may import modules of its own layer or below. The command-line
# entry points sit above everything.
LAYERS = [
    {'names', 'settings', 'layout', 'flops', 'kernels', 'grouped_matmul', 'routing', 'losses',
     'sharding', 'capacity', 'budget_settings', 'data', 'plots'},
    {'dispatch', 'expert_parallel', 'experts', 'routers'},
    {'layers'},
    {'nnx_layers', 'adaptive', 'upcycle', 'models', 'checkpointing'},
    {'default_config', 'config_lib'},
    {'train'},
    {'dryrun', 'sample', 'main', '__init__'},
]
# main.py parses flags and picks JAX's platform before the library (and JAX's backends)
# load, so its imports are inside its functions on purpose.
LOCAL_IMPORTS_ALLOWED = {'main'}


def layer_of(module: str) -> int:
  top = module.split('.')[0]
  for rank, names in enumerate(LAYERS):
    if top in names:
      return rank
  raise AssertionError(f'dynmoe_jax.{module} is in no layer of tests/test_structure.py')


def library_imports(tree):
  """(node, imported dynmoe_jax module relative name) for each import of the package."""
  for node in ast.walk(tree):
    if isinstance(node, ast.ImportFrom) and node.module and (
        node.module == 'dynmoe_jax' or node.module.startswith('dynmoe_jax.')):
      base = node.module[len('dynmoe_jax.'):] if node.module != 'dynmoe_jax' else ''
      for alias in node.names:
        yield node, f'{base}.{alias.name}'.strip('.') if base else alias.name
    elif isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.startswith('dynmoe_jax.'):
          yield node, alias.name[len('dynmoe_jax.'):]


def modules():
  for path in sorted(PACKAGE.rglob('*.py')):
    yield path, '.'.join(path.relative_to(PACKAGE).with_suffix('').parts)


def test_library_layers_import_downward_only_and_at_the_top():
  problems = []
  for path, module in modules():
    tree = ast.parse(path.read_text())
    top_level = {id(node) for node in tree.body}
    own = layer_of(module)
    for node, imported in library_imports(tree):
      where = f'{path.relative_to(ROOT)}:{node.lineno}'
      if layer_of(imported) > own:
        problems.append(f'{where}: {module} (layer {own}) imports {imported} '
                        f'(layer {layer_of(imported)})')
      if id(node) not in top_level and module.split('.')[0] not in LOCAL_IMPORTS_ALLOWED:
        problems.append(f'{where}: {module} imports {imported} inside a function')
  assert not problems, '\n'.join(problems)


def test_no_library_function_is_over_80_lines():
  long = []
  for path, _ in modules():
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
        length = node.end_lineno - node.lineno + 1
        if length > 80:
          long.append(f'{path.relative_to(ROOT)}:{node.lineno} {node.name}: {length} lines')
  assert not long, '\n'.join(long)


@pytest.mark.parametrize('folder', ['dynmoe_jax', 'experiments', 'tests', 'configs'])
def test_no_file_is_over_400_lines(folder):
  long = [f'{p.relative_to(ROOT)}: {n} lines'
          for p in sorted((pathlib.Path(ROOT) / folder).rglob('*.py'))
          if (n := len(p.read_text().splitlines())) > 400]
  assert not long, '\n'.join(long)
