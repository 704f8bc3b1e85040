"""Forward+backward time of the MoE layer vs a dense FFN and a naive all-experts MoE.

Measured side by side in one process, under jit, as the median of repeated
steps after a compile-and-warm-up call:
  * dense:  FFN with hidden 2F (the activated FLOPs of a top-2 MoE, no routing)
  * top_k:  MoE, k=2, each dispatch impl (sort, einsum, ragged)
  * top_any: DynMoE gating with thresholds set so about 2 experts are active
  * top_any~1.3/sort/planned: thresholds for about 1.3 experts, capacity planned from this
    batch's routing as `adaptive.capacity` plans it (busiest expert x 1.1 headroom), at
    most --planned_max_k experts per token (the sorted pair list is T·max_k long)
  * naive:  every expert on every token, masked by the router (dispatch_impl='all_experts_reference')

Prints a table, writes JSON and a PNG. Timings on a shared CPU are noisy: read
the ratios (each row / dense in the same run), not the absolute times.

  python experiments/bench_layer.py                       # the issue's sizes
  python experiments/bench_layer.py --experts 8 --tokens 512 --reps 2   # smoke run
  python experiments/bench_layer.py --experts 16 --impls einsum --group_sizes 1024 256 64 \
      --naive_max_experts 0 --planned_active 0      # routing groups: einsum's cost per group
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform

import flax.linen as nn
import jax
import jax.numpy as jnp

import common
from dynmoe_jax import adaptive, capacity, layers, routers, routing
from dynmoe_jax.capacity import Capacity


class DenseFFN(nn.Module):
  hidden_dim: int

  @nn.compact
  def __call__(self, x, training=True):
    h = nn.gelu(nn.Dense(self.hidden_dim, use_bias=False)(x))
    return nn.Dense(x.shape[-1], use_bias=False)(h), None


def tune_top_any_thresholds(params, x, target_active):
  """Per-expert thresholds G so that about `target_active` experts fire per token:
  G_e is the (1 - target/E) quantile of cos(x, W_e) over the batch."""
  cos = routing.cosine_similarity(x.reshape(-1, x.shape[-1]), params['gate_embeddings'])
  num_experts = cos.shape[1]
  q = 1.0 - target_active / num_experts
  return jnp.quantile(cos, q, axis=0)


def planned_top_any(num_experts, hidden, x, rng, target_active, max_k):
  """A top-any layer at about `target_active` experts per token whose capacity is
  planned from its own routing of `x`, as `adaptive.capacity` plans it from a window;
  max_k bounds its pair list (T·max_k pairs to sort instead of T·E)."""
  module = layers.MoE(num_experts=num_experts, hidden_dim=hidden,
                      router=routers.TopAny(expected_k=target_active,
                                            max_k=min(max_k, num_experts) if max_k else None),
                      capacity=Capacity(factor=1.25))
  variables = nn.meta.unbox(module.init(rng, x))
  params = dict(variables['params'])
  params['thresholds'] = tune_top_any_thresholds(params, x, target_active)
  _, aux = module.apply({'params': params}, x, training=True)
  window = adaptive.RecordAccumulator.empty(num_experts, x.shape[-1])
  window.add(jax.device_get(aux.record))
  rule = capacity.PlanRule(quantile=1.0, headroom=1.1, max_dropped=0.01, tolerance=0.0,
                           multiple_of=module.capacity.multiple_of)
  planned = capacity.plan_from_loads(window.step_loads, window.step_tokens, range(num_experts),
                                     rule, current=0)
  return (module.clone(capacity=dataclasses.replace(module.capacity, planned=planned)),
          {'params': params})


def make_step(module):
  def loss(variables, x, cotangent):
    y, aux = module.apply(variables, x, training=True)
    aux_loss = 0.0 if aux is None else aux.loss
    return jnp.sum(y * cotangent) + aux_loss, aux

  grad_fn = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)

  @jax.jit
  def step(variables, x, cotangent):
    (value, aux), grads = grad_fn(variables, x, cotangent)
    metrics = {} if aux is None else {k: aux.metrics[k] for k in ('active_experts',
                                                                 'dropped_fraction')}
    return value, grads, metrics
  return step


def time_step(step, args, reps):
  seconds, compile_s, out = common.time_call(lambda: step(*args), reps)
  return seconds, compile_s, {k: float(v) for k, v in out[2].items()}


def build_cases(num_experts, hidden, impls, include_naive, group_sizes=()):
  cases = []
  for group_size in group_sizes:  # GShard routing groups: einsum's O(T·E·C) per group
    cases.append((f'top_k2/einsum/group{group_size}',
                  dict(router=routers.TopK(k=2), dispatch_impl='einsum',
                       capacity=Capacity(factor=1.25, group_size=group_size))))
  for impl in impls:
    cases.append((f'top_k2/{impl}', dict(router=routers.TopK(k=2), dispatch_impl=impl)))
    cases.append((f'top_any~2/{impl}', dict(router=routers.TopAny(), dispatch_impl=impl)))
  if include_naive:
    cases.append(('naive_all_experts', dict(router=routers.TopK(k=2),
                                            dispatch_impl='all_experts_reference')))
  return [(name, layers.MoE(num_experts=num_experts, hidden_dim=hidden,
                            **{'capacity': Capacity(factor=1.25), **kw})) for name, kw in cases]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--experts', type=int, nargs='+', default=[8, 16, 32, 64])
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--impls', nargs='+', default=['sort', 'einsum', 'ragged'])
  parser.add_argument('--naive_max_experts', type=int, default=64,
                      help='run the naive all-experts MoE only up to this many experts')
  parser.add_argument('--planned_active', type=float, default=1.3,
                      help='experts per token of the planned-capacity top-any case (0: skip)')
  parser.add_argument('--planned_max_k', type=int, default=4,
                      help='max_k of the planned-capacity top-any case (0: none, T·E pairs)')
  parser.add_argument('--group_sizes', type=int, nargs='*', default=[],
                      help='also top-2 einsum rows with routing groups of these many tokens')
  parser.add_argument('--reps', type=int, default=5)
  parser.add_argument('--out', default=common.scratch_out('bench_layer'),
                      help=common.OUT_HELP)
  args = parser.parse_args()
  uneven = [g for g in args.group_sizes if g <= 0 or args.tokens % g]
  if uneven:
    parser.error(f'--group_sizes {uneven} do not divide --tokens {args.tokens} into groups')

  rng = jax.random.PRNGKey(0)
  x = jax.random.normal(rng, (args.tokens, args.dim), jnp.float32)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), x.shape, jnp.float32)
  rows = []

  dense = DenseFFN(2 * args.hidden)
  dense_vars = dense.init(rng, x)
  dense_s, _, _ = time_step(make_step(dense), (dense_vars, x, cotangent), args.reps)
  rows.append(dict(name='dense_2F', experts=0, seconds=dense_s, vs_dense=1.0))
  print(f'dense FFN hidden {2 * args.hidden}: {dense_s * 1e3:.1f} ms', flush=True)

  for num_experts in args.experts:
    for name, module in build_cases(num_experts, args.hidden, args.impls,
                                    num_experts <= args.naive_max_experts, args.group_sizes):
      variables = nn.meta.unbox(module.init(rng, x))
      if module.router == 'top_any':
        params = dict(variables['params'])
        params['thresholds'] = tune_top_any_thresholds(params, x, 2.0)
        variables = {'params': params}
      seconds, compile_s, metrics = time_step(make_step(module), (variables, x, cotangent),
                                              args.reps)
      rows.append(dict(name=name, experts=num_experts, seconds=seconds, compile_s=compile_s,
                       vs_dense=seconds / dense_s, **metrics))
      print(f'E={num_experts:3d} {name:22s} {seconds * 1e3:9.1f} ms  {seconds / dense_s:6.2f}x '
            f'dense  active={metrics["active_experts"]:.2f} '
            f'dropped={metrics["dropped_fraction"]:.3f}', flush=True)
    if args.planned_active and 'sort' in args.impls:
      name = f'top_any~{args.planned_active:g}/sort/planned'
      module, variables = planned_top_any(num_experts, args.hidden, x, rng, args.planned_active,
                                          args.planned_max_k)
      seconds, compile_s, metrics = time_step(make_step(module), (variables, x, cotangent),
                                              args.reps)
      rows.append(dict(name=name, experts=num_experts, seconds=seconds, compile_s=compile_s,
                       vs_dense=seconds / dense_s, capacity=module.capacity.planned[0],
                       **metrics))
      print(f'E={num_experts:3d} {name:22s} {seconds * 1e3:9.1f} ms  {seconds / dense_s:6.2f}x '
            f'dense  active={metrics["active_experts"]:.2f} '
            f'dropped={metrics["dropped_fraction"]:.3f} capacity={module.capacity.planned[0]}',
            flush=True)

  summary = summarize(rows, args.experts)
  report = dict(config=vars(args), device=str(jax.devices()[0]), backend=jax.default_backend(),
                cpu_count=os.cpu_count(), machine=platform.machine(), jax=jax.__version__,
                rows=rows, summary=summary)
  os.makedirs(os.path.dirname(args.out) or '.', exist_ok=True)
  with open(args.out + '.json', 'w') as f:
    json.dump(report, f, indent=2)
  print_table(rows, summary)
  plot(rows, args.out + '.png', args)
  print(f'wrote {args.out}.json and {args.out}.png')


def summarize(rows, experts):
  """The issue's three targets, from rows of this run."""
  get = lambda name, e: next((r['seconds'] for r in rows
                              if r['name'] == name and r['experts'] == e), None)
  dense = rows[0]['seconds']
  out = {}
  lo, hi = min(experts), max(experts)
  for impl in ('sort', 'einsum', 'ragged'):
    name = f'top_k2/{impl}'
    if get(name, lo) is not None:
      out[f'{name} E={lo} / dense'] = get(name, lo) / dense
      if get(name, hi) is not None and hi != lo:
        out[f'{name} E={hi} / E={lo}'] = get(name, hi) / get(name, lo)
      if 32 in experts and get('naive_all_experts', 32) and get(name, 32):
        out[f'naive E=32 / {name}'] = get('naive_all_experts', 32) / get(name, 32)
  for r in rows:
    if '/group' in r['name'] and get('top_k2/einsum', r['experts']):
      out[f"{r['name']} E={r['experts']} / top_k2/einsum"] = (
          r['seconds'] / get('top_k2/einsum', r['experts']))
    if r['name'].endswith('/planned') and get('top_k2/sort', r['experts']):
      out[f"{r['name']} E={r['experts']} / top_k2/sort"] = (
          r['seconds'] / get('top_k2/sort', r['experts']))
  return out


def print_table(rows, summary):
  print('\n| layer | E | fwd+bwd ms | x dense | active/token | dropped |')
  print('|---|---|---|---|---|---|')
  for r in rows:
    print(f"| {r['name']} | {r['experts'] or '-'} | {r['seconds'] * 1e3:.1f} | "
          f"{r['vs_dense']:.2f} | {r.get('active_experts', float('nan')):.2f} | "
          f"{r.get('dropped_fraction', float('nan')):.3f} |")
  print('\n| ratio | value |\n|---|---|')
  for k, v in summary.items():
    print(f'| {k} | {v:.2f} |')


def plot(rows, path, args):
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  names = sorted({r['name'] for r in rows if r['experts']})
  for name in names:
    pts = [(r['experts'], r['vs_dense']) for r in rows if r['name'] == name]
    ax.plot(*zip(*pts), marker='o', label=name)
  ax.axhline(1.0, color='k', lw=0.8, ls='--', label='dense FFN 2F')
  ax.set_xscale('log', base=2)
  ax.set_yscale('log')
  ax.set_xlabel('experts E')
  ax.set_ylabel('fwd+bwd time / dense (same run)')
  ax.set_title(f'MoE layer, T={args.tokens} D={args.dim} F={args.hidden} cf=1.25 '
               f'({jax.default_backend()})')
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=120)


if __name__ == '__main__':
  main()
