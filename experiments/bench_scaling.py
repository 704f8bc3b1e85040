"""Where a top-2 MoE layer with more experts costs more at the same tokens and k.

Times, interleaved (E=8, then E=64, then again, ...) in one process, the medians of
fwd+bwd under jit of:
  * the whole `layers.MoE` layer (sort dispatch, capacity factor 1.25, its aux losses);
  * its expert FFNs alone on [E, C, D] buffers of the same slots (E·C = 1.25·2·T): the same
    FLOPs at every E, but E times the weights read and the weight gradients written;
  * the router alone (logits, top-2, softmax weights);
  * the sorted pair list alone (`dispatch._sort_pairs`, max_k = k = 2);
  * the FFNs' up-projection alone (forward) and its weight gradient alone: the same FLOPs
    at every E; fixed weight traffic would show as a ratio that falls as tokens grow.
Prints a table, writes JSON and a PNG. Read the ratios (same run), not absolute times.

  python experiments/bench_scaling.py                  # T=4096, D=256, F=512, E=8 and 64
  python experiments/bench_scaling.py --tokens 512 --reps 2   # smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import common
from dynmoe_jax import dispatch, experts, layers, plots, routers, routing
from dynmoe_jax.capacity import Capacity


def cases(num_experts: int, tokens: int, dim: int, hidden: int, cotangent):
  """name -> (jitted fwd+bwd function, its arguments)."""
  x = jax.random.normal(jax.random.PRNGKey(0), (tokens, dim))
  moe = layers.MoE(num_experts=num_experts, hidden_dim=hidden, router=routers.TopK(k=2),
                   capacity=Capacity(factor=1.25))
  variables = nn.meta.unbox(moe.init(jax.random.PRNGKey(0), x))
  params = variables['params']
  capacity = moe.slots_per_expert(tokens, training=True)

  def layer(v, x):
    y, aux = moe.apply(v, x, training=True)
    return jnp.sum(y * cotangent) + aux.loss

  def ffn(wi, wo, buffers):
    out = experts.ExpertFFN(wi, None, wo, nn.gelu).on_buffers(buffers)
    return jnp.sum(out * buffers)

  def router(kernel, x):
    route = routing.top_k(x @ kernel, 2)
    return jnp.sum(route.weights * route.scores)

  route = routing.top_k(x @ params['router_kernel'], 2)
  buffers = jax.random.normal(jax.random.PRNGKey(2), (num_experts, capacity, dim))
  return {
      'MoE layer': (jax.jit(jax.grad(layer, argnums=(0, 1))), (variables, x)),
      'expert FFNs alone': (jax.jit(jax.grad(ffn, argnums=(0, 1, 2))),
                            (params['wi'], params['wo'], buffers)),
      'router alone': (jax.jit(jax.grad(router, argnums=(0, 1))), (params['router_kernel'], x)),
      'pair list alone (forward)': (jax.jit(lambda m, s: dispatch._sort_pairs(m, s, 2)),
                          (route.mask, route.scores)),
      # the FFNs' first matmul and its weight gradient: E·C·D·F FLOPs at every E, but the
      # weights read / the gradient written grow with E and each expert's matrix shrinks
      'up-projection alone (forward)': (jax.jit(lambda b, w: jnp.einsum('ecd,edf->ecf', b, w)),
                                        (buffers, params['wi'])),
      'its weight gradient alone': (jax.jit(lambda b, g: jnp.einsum('ecd,ecf->edf', b, g)),
                                    (buffers, jnp.ones((num_experts, capacity, hidden)))),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--experts', type=int, nargs=2, default=[8, 64])
  parser.add_argument('--tokens', type=int, default=4096)
  parser.add_argument('--dim', type=int, default=256)
  parser.add_argument('--hidden', type=int, default=512)
  parser.add_argument('--reps', type=int, default=9)
  parser.add_argument('--out', default=common.scratch_out('bench_scaling'),
                      help=common.OUT_HELP)
  args = parser.parse_args(argv)
  cotangent = jax.random.normal(jax.random.PRNGKey(1), (args.tokens, args.dim))
  small, large = args.experts
  built = {e: cases(e, args.tokens, args.dim, args.hidden, cotangent) for e in args.experts}
  for per_e in built.values():
    for fn, fn_args in per_e.values():
      jax.block_until_ready(fn(*fn_args))  # compile and warm up
  seconds = {(e, name): [] for e in args.experts for name in built[small]}
  for _ in range(args.reps):
    for name in built[small]:
      for e in args.experts:
        fn, fn_args = built[e][name]
        start = time.perf_counter()
        jax.block_until_ready(fn(*fn_args))
        seconds[(e, name)].append(time.perf_counter() - start)
  rows = []
  for name in built[small]:
    a, b = (float(np.median(seconds[(e, name)])) for e in args.experts)
    rows.append({'piece': name, f'ms_E{small}': 1e3 * a, f'ms_E{large}': 1e3 * b,
                 'ratio': b / a})
  print(f'| piece (fwd+bwd, T={args.tokens}, D={args.dim}, F={args.hidden}, top-2) | '
        f'E={small} ms | E={large} ms | E={large} / E={small} |')
  print('|---|---|---|---|')
  for r in rows:
    print(f"| {r['piece']} | {r[f'ms_E{small}']:.1f} | {r[f'ms_E{large}']:.1f} | "
          f"{r['ratio']:.2f} |")
  report = dict(config=vars(args), device=str(jax.devices()[0]), cpu_count=os.cpu_count(),
                machine=platform.machine(), jax=jax.__version__, rows=rows)
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  common.save_json(args.out + '.json', report)

  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 3.5))
  names = [r['piece'] for r in rows]
  pos = np.arange(len(rows))
  ax.barh(pos - 0.2, [r[f'ms_E{small}'] for r in rows], 0.4, label=f'E={small}')
  ax.barh(pos + 0.2, [r[f'ms_E{large}'] for r in rows], 0.4, label=f'E={large}')
  for p, r in zip(pos, rows):
    ax.text(max(r[f'ms_E{small}'], r[f'ms_E{large}']) * 1.02, p, f"{r['ratio']:.2f}x",
            va='center', fontsize=8)
  ax.set_yticks(pos, names)
  ax.invert_yaxis()
  ax.set_xlabel(f'fwd+bwd ms (median of {args.reps}, interleaved), {jax.devices()[0].platform}')
  ax.legend(fontsize=8)
  print('wrote', args.out + '.json', 'and', plots.save_figure(fig, args.out + '.png', dpi=120))


if __name__ == '__main__':
  main()
