"""Experiment scripts write only where --out says, and by default never over the committed
tables and plots in experiments/results/."""
import ast
import glob
import os

import pytest

from tests.conftest import ROOT

SCRIPTS = sorted(glob.glob(os.path.join(ROOT, 'experiments', '*.py')))


def out_default(path):
  """The source text of the `default=` of the script's --out argument, or None."""
  tree = ast.parse(open(path).read())
  for node in ast.walk(tree):
    if (isinstance(node, ast.Call) and getattr(node.func, 'attr', '') == 'add_argument'
        and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value == '--out'):
      for keyword in node.keywords:
        if keyword.arg == 'default':
          return ast.unparse(keyword.value)
      return 'required' if any(k.arg == 'required' for k in node.keywords) else None
  return None


@pytest.mark.parametrize('path', SCRIPTS, ids=os.path.basename)
def test_no_experiment_writes_the_committed_results_by_default(path):
  default = out_default(path)
  if default is None or default == 'required':
    return  # no --out, or one the user must give
  assert default.startswith('common.scratch_out('), (path, default)
  assert 'results' not in default, (path, default)


def test_the_scratch_folder_is_ignored_by_git():
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import common
  scratch = os.path.relpath(common.scratch_out('x'), ROOT)
  assert scratch.split(os.sep)[0] + '/' in open(os.path.join(ROOT, '.gitignore')).read()


def test_load_ratio_counts_only_the_layout_the_run_ended_with():
  # adaptive experts: a boundary inside the window changed the expert count (2 -> 3); the
  # steps before it have another number of loads and are left out
  import sys
  sys.path.insert(0, os.path.join(ROOT, 'experiments'))
  import common
  key = 'moe/layer_1/expert_load'
  rows = [{'step': 10, key: [0.5, 0.5]}, {'step': 20, key: [0.6, 0.4]},
          {'step': 30, key: [0.5, 0.3, 0.2]}, {'step': 40, key: [0.5, 0.2, 0.3]}]
  assert common.load_ratio(rows, ['layer_1'], 100) == {'layer_1': pytest.approx(0.5 / 0.25)}
  assert common.load_ratio(rows[:2], ['layer_1'], 100) == {'layer_1': pytest.approx(0.55 / 0.45)}
