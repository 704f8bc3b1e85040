"""Every command the README, docs/ and experiments/results/ give, run as written at small
sizes, each in its own process: a table of what ran, for how long and how it ended.

A command runs as the reader would type it, with four changes, each listed in the table's
`ran` column:
  * sizes: steps, widths, seeds and repetitions shrink through the command's own flags
    (SMALL, MAIN_SMALL), appended; a flag the command already gives is replaced, so a
    documented `--seeds 0,1,2` runs as `--seeds 0`. Dry runs (`--dry_run`) run unchanged;
  * outputs: what a command writes (`--workdir`, `--out`, `WORKDIR=`) goes under a scratch
    folder of its own, never into experiments/results/ or the reader's workdir/; a command
    that reads an earlier one's output (`--config.init_from`, `sample --workdir`) reads
    it there;
  * devices: a config whose mesh needs N devices runs on N fake CPU devices; a multi-host
    command (`--num_processes=N`) runs as N local processes with gloo CPU collectives;
  * placeholders a reader fills in are filled in (FILLED_IN); `python` is this interpreter.
Not run: `make test`/`make test-fast` (the suite: `.ci/run`), installation lines, and
`main ...`. Commands that read a workdir run after those that write one.

  python experiments/docs_commands.py                 # every command (~35 minutes, 2 cores)
  python experiments/docs_commands.py --list          # what would run, nothing run
  python experiments/docs_commands.py --only sample,upcycl,24   # commands holding a word

Writes OUT/results.json, OUT/results.md and OUT/seconds.png; exits 1 if a command failed.
The same extraction checks every command's flags in the test suite
(tests/test_docs_commands.py).
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Dict, List, Optional, Sequence, Tuple

import common
from documented import (NOT_RUN, ROOT, classify, documented_commands, filled_in, make_settings,
                        parsed_config)
from dynmoe_jax import dryrun

# ----------------------------------------------------------------------------- planning

# A sample command's DIR is a language model's workdir: the one lm_small.md trains.
RUN_FILLED_IN = (('dynmoe_jax.sample --workdir=DIR', 'dynmoe_jax.sample --workdir=workdir/lm_small'),)
# Each script's own small-size flags (what its tests or docstring use for a smoke run).
SMALL = {
    'compare_routers': ['--preset', 'smoke', '--seeds', '0', '--timing_rounds', '1',
                        '--timing_steps', '2'],
    'mnist1d_experts': ['--steps', '10', '--adaptive_every', '5', '--seeds', '0'],
    'bench_layer': ['--tokens', '1024', '--dim', '32', '--hidden', '64', '--reps', '1'],
    'bench_scaling': ['--tokens', '256', '--dim', '32', '--hidden', '64', '--reps', '1'],
    'bench_sharding': ['--tokens', '256', '--dim', '32', '--hidden', '64', '--reps', '1'],
    'mesh_matrix': ['--steps', '4'],
    'lm_small': ['--num_train_steps', '2', '--eval_split', 'test[:64]'],
    'adaptation_cost': ['--rounds', '1', '--steps', '2', '--every', '8', '--record_steps', '2',
                        '--leads', '0,4', '--boundaries', '1'],
    'upcycle': ['--dense_steps', '4', '--more_steps', '4', '--seeds', '0'],
    'device_check': ['--smoke'],
    'sample': ['--max_new=8'],
}
MAIN_SMALL = ['--config.num_train_steps=6', '--config.log_every=2', '--config.eval_every=6',
              '--config.checkpoint_every=6', '--config.progress_bar=False',
              '--config.model.num_layers=2']
# one adaptive boundary (experts or capacity) inside those 6 steps
ADAPTIVE_SMALL = ['--config.adaptive.every=4', '--config.adaptive.record_steps=2',
                  '--config.adaptive.compile_lead_steps=1']
CLASSIFIER_SMALL = ['--config.eval_batch_size=100']
LM_SMALL = ['--config.batch_size=8', '--config.eval_batch_size=8', '--config.data.seq_len=64',
            '--config.data.eval_split=test[:32]']
DECODER_SMALL = ['--config.model.dim=64', '--config.model.num_heads=4',
                 '--config.model.mlp_dim=64', '--config.model.moe.hidden_dim=32']
WRITES = ('--workdir', '--out')
READS = {'sample': ('--workdir',), 'main': ('--config.init_from',)}


@dataclasses.dataclass
class Run:
  where: str
  documented: str
  kind: str
  launcher: List[str]          # the interpreter and script, or `make train`
  args: List[str]
  env: Dict[str, str] = dataclasses.field(default_factory=dict)
  processes: int = 1
  also: List[str] = dataclasses.field(default_factory=list)  # the same command elsewhere
  problem: Optional[str] = None  # why it cannot run (found while planning)
  needs: List[int] = dataclasses.field(default_factory=list)  # runs whose output it reads

  def command(self, process: int = 0, port: int = 0) -> List[str]:
    args = [a.replace('{process_id}', str(process)).replace('{port}', str(port))
            for a in self.args]
    if self.launcher[0] != 'make':
      return [*self.launcher, *args]
    config, workdir = (_value(args, flag) for flag in ('--config', '--workdir'))
    rest = [a for a in args if _flag(a) not in ('--config', '--workdir')]
    return ['make', 'train', f'CONFIG={config}', f'WORKDIR={workdir}', f'ARGS={shlex.join(rest)}']


def _flag(arg: str) -> str:
  return arg.split('=', 1)[0]


def _value(args: Sequence[str], flag: str) -> Optional[str]:
  for i, arg in enumerate(args):
    if arg.startswith(flag + '='):
      return arg.split('=', 1)[1]
    if arg == flag and i + 1 < len(args):
      return args[i + 1]
  return None


def with_sizes(args: Sequence[str], small: Sequence[str]) -> List[str]:
  """`args` with each flag `small` sets dropped (its values too), then `small` appended."""
  replaced = {_flag(a) for a in small if a.startswith('--')}
  out, dropping = [], False
  for arg in args:
    if arg.startswith('--'):
      dropping = _flag(arg) in replaced
      if dropping:
        continue
    elif dropping:
      continue
    out.append(arg)
  return out + list(small)


def planned(command: dict, line: str) -> Run:
  """What runs for one documented command (its paths still as documented)."""
  kind, args = command['kind'], list(command['argv'])
  run = Run(command['where'], line, kind, [], args)
  if kind == 'main':
    if line.startswith('make '):
      run.launcher = ['make', 'train']
      run.args = [args[0], f"--workdir={make_settings(shlex.split(line))['WORKDIR']}", *args[1:]]
    else:
      run.launcher = [sys.executable, '-m', 'dynmoe_jax.main']
    if '--dry_run' not in args:  # a dry run trains nothing: it runs as written
      _main_sizes_and_devices(run)
  elif kind == 'sample':
    run.launcher = [sys.executable, '-m', 'dynmoe_jax.sample']
    run.args = with_sizes(args, SMALL[kind])
  else:
    run.launcher = [sys.executable, os.path.join('experiments', f'{kind}.py')]
    run.args = with_sizes(args, SMALL.get(kind, []))
    if _value(run.args, '--out') is None:  # not the script's default, under the reader's workdir/
      run.args += ['--out', os.path.join('experiments', 'results', kind)]
    if kind not in SMALL:
      run.problem = f'no small size for experiments/{kind}.py: add it to SMALL'
  return run


def _main_sizes_and_devices(run: Run):
  config = parsed_config(run.args)
  small = MAIN_SMALL + (LM_SMALL if config.data.kind == 'lm' else CLASSIFIER_SMALL)
  small += DECODER_SMALL if config.model.arch == 'decoder' else []
  small += ADAPTIVE_SMALL if config.adaptive.enabled or config.adaptive.capacity else []
  run.args = with_sizes(run.args, small)
  processes = int(_value(run.args, '--num_processes') or 1)
  if processes > 1:  # N local processes: a free port, each its own id, CPU collectives
    run.processes = processes
    run.args = [re.sub(r':\d+$', ':{port}', a) if _flag(a) == '--coordinator_address' else
                '--process_id={process_id}' if _flag(a) == '--process_id' else a
                for a in run.args] + ['--cpu_collectives=gloo']
  devices = dryrun.devices_needed(config, None) // processes
  if devices > 1:
    run.env['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                            f' --xla_force_host_platform_device_count={devices}').strip()


def plan(commands: Sequence[Tuple[str, str]]) -> Tuple[List[Run], List[dict]]:
  """Runs (one per distinct command; readers of a workdir after its writers) and the
  commands not run, with why."""
  runs, not_run, first = [], [], {}
  for where, documented in commands:
    documented = ' '.join(documented.split())
    line = documented
    for placeholder, value in RUN_FILLED_IN:
      line = line.replace(placeholder, value)
    command = classify(where, line)
    kind = command['kind'] if isinstance(command, dict) else command[0]
    if not isinstance(command, dict) or kind in NOT_RUN:
      not_run.append({'where': where, 'documented': documented,
                      'why': NOT_RUN.get(kind, 'not a command this script knows')})
      continue
    run = planned(command, filled_in(line))
    run.documented = documented
    key = (tuple(run.launcher), tuple(run.args), run.processes)
    if key in first:
      first[key].also.append(f'{where}: {documented}')
    else:
      first[key] = run
      runs.append(run)
  runs.sort(key=lambda r: r.kind == 'sample' or _value(r.args, '--config.init_from') is not None)
  return runs, not_run


def place(runs: Sequence[Run], scratch: str):
  """Outputs under scratch/NN/ (NN: the run's number); reads of an earlier run's output
  pointed there."""
  written = {}  # documented path -> (its place, the run that writes it)
  for number, run in enumerate(runs):
    home = os.path.join(scratch, f'{number:02d}')
    reads = READS.get(run.kind, ())
    for i, arg in enumerate(run.args):
      flag = _flag(arg)
      if flag not in WRITES + reads or '=' not in arg and i + 1 == len(run.args):
        continue
      inline = '=' in arg
      path = arg.split('=', 1)[1] if inline else run.args[i + 1]
      key = os.path.normpath(path)
      if flag in reads:
        if key not in written:
          run.problem = f'{flag} {path}: no command before it writes there'
          continue
        moved, writer = written[key]
        run.needs.append(writer)
      else:
        moved = os.path.join(home, path.lstrip('/'))
        written[key] = moved, number
      if inline:
        run.args[i] = f'{flag}={moved}'
      else:
        run.args[i + 1] = moved


# ----------------------------------------------------------------------------- running

def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def execute(run: Run, log_path: str, timeout: float) -> dict:
  """Run it (all its processes at once); seconds, exit code and its output's last lines."""
  if run.problem:
    return {'seconds': 0.0, 'returncode': None, 'tail': [run.problem]}
  os.makedirs(os.path.dirname(log_path), exist_ok=True)
  port, start = free_port(), time.time()
  env = {**os.environ, **run.env}
  with open(log_path, 'w') as log:
    # a session each: a timeout stops the command's own workers too (compare_routers' runs)
    procs = [subprocess.Popen(run.command(i, port), cwd=ROOT, env=env, stdout=log,
                              stderr=subprocess.STDOUT, text=True, start_new_session=True)
             for i in range(run.processes)]
    codes = []
    for proc in procs:
      try:
        codes.append(proc.wait(timeout=max(1.0, timeout - (time.time() - start))))
      except subprocess.TimeoutExpired:
        for p in procs:
          with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)
          p.wait()
        codes.append('timeout')
        break
  lines = [l for l in open(log_path, errors='replace').read().splitlines() if l.strip()]
  failed = [c for c in codes if c != 0]
  return {'seconds': round(time.time() - start, 1),
          'returncode': failed[0] if failed else 0, 'tail': lines[-8:] if failed else lines[-1:]}


def row(number: int, run: Run, result: dict) -> dict:
  return {'number': number, 'where': run.where, 'kind': run.kind, 'documented': run.documented,
          'also': run.also,
          'ran': shlex.join(run.command(0, 0)).replace(sys.executable, 'python'),
          'processes': run.processes, 'env': run.env, **result,
          'ok': result['returncode'] == 0}


def error_line(tail: Sequence[str]) -> str:
  """The line of a failed command's output that names the error (not make's or JAX's
  trailer)."""
  named = [l for l in tail if re.match(r'(\w+(Error|Exception)\b|error:|\S+: error:)', l)]
  return (named or [l for l in tail if not l.startswith('make: ***')] or list(tail) or ['?'])[-1]


def markdown(rows: Sequence[dict], not_run: Sequence[dict]) -> str:
  lines = ['| # | where | command (as documented) | seconds | result |',
           '|---|---|---|---:|---|']
  for r in rows:
    result = ('ok' if r['ok'] else f"TIMED OUT after {r['seconds']:.0f} s"
              if r['returncode'] == 'timeout' else
              f"FAILED ({r['returncode']}): {error_line(r['tail'])[:120]}")
    also = f" (also {len(r['also'])} more)" if r['also'] else ''
    lines.append(f"| {r['number']} | {r['where']}{also} | `{r['documented']}` | "
                 f"{r['seconds']:.0f} | {result} |")
  lines += ['', 'Not run:', '']
  lines += [f"- {n['where']}: `{n['documented']}`: {n['why']}" for n in not_run]
  return '\n'.join(lines) + '\n'


def plot(rows: Sequence[dict], path: str):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(8, 0.22 * len(rows) + 1.2))
  ax.barh([f"{r['number']} {r.get('kind', '')} ({r['where'].split('/')[-1]})" for r in rows],
          [r['seconds'] for r in rows], color=['tab:green' if r['ok'] else 'tab:red' for r in rows])
  ax.invert_yaxis()
  ax.set_xlabel('seconds (green: ran, red: failed)')
  ax.set_title('Documented commands at small sizes')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default=common.scratch_out('docs_commands'),
                      help='where results.json, results.md and seconds.png go')
  parser.add_argument('--only', default='',
                      help="comma-separated words or numbers (--list's): run the commands "
                           'whose line holds one, and those whose output they read')
  parser.add_argument('--list', action='store_true', help='print what would run; run nothing')
  parser.add_argument('--timeout', type=float, default=1800, help='seconds per command')
  parser.add_argument('--keep_runs', default=None,
                      help='a new folder: each run\'s outputs and log are kept there '
                           '(default: a temporary folder, removed at the end)')
  args = parser.parse_args(argv)
  runs, not_run = plan(documented_commands())
  words = [w for w in args.only.split(',') if w]
  if args.keep_runs and os.path.exists(args.keep_runs):
    parser.error(f'--keep_runs {args.keep_runs} exists: give a new folder')
  with (contextlib.nullcontext(os.path.abspath(args.keep_runs)) if args.keep_runs else
        tempfile.TemporaryDirectory(prefix='docs_commands_')) as scratch:
    place(runs, scratch)
    picked = {n for n, r in enumerate(runs)
              if not words or any(w == str(n) if w.isdigit() else w in r.documented or w == r.kind
                                  for w in words)}
    picked |= {n for p in picked for n in runs[p].needs}  # and what they read
    chosen = [(n, r) for n, r in enumerate(runs) if n in picked]
    if not chosen:
      parser.error(f'--only {args.only!r} matches none of the {len(runs)} commands')
    if args.list:
      for number, run in chosen:
        print(f'{number:2d} {run.where}: {run.documented}\n   runs: '
              f'{shlex.join(run.command(0, 0))}' + (f'\n   {run.problem}' if run.problem else ''))
      return None
    rows = []
    for number, run in chosen:
      print(f'[{len(rows) + 1}/{len(chosen)}] {run.where}: {run.documented}', flush=True)
      rows.append(row(number, run, execute(run, os.path.join(scratch, f'{number:02d}.log'),
                                            args.timeout)))
      print(f"    {'ok' if rows[-1]['ok'] else 'FAILED'} in {rows[-1]['seconds']:.0f} s",
            flush=True)
  os.makedirs(args.out, exist_ok=True)
  table = markdown(rows, not_run)
  print(table)
  with open(os.path.join(args.out, 'results.json'), 'w') as f:
    json.dump({'rows': rows, 'not_run': not_run}, f, indent=1)
  with open(os.path.join(args.out, 'results.md'), 'w') as f:
    f.write(table)
  plot(rows, os.path.join(args.out, 'seconds.png'))
  failed = [r for r in rows if not r['ok']]
  print(f'{len(rows) - len(failed)} of {len(rows)} commands ran; results in {args.out}')
  return 1 if failed else 0


if __name__ == '__main__':
  sys.exit(main())
