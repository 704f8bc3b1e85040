"""Sparse upcycling: start an MoE model from a dense checkpoint (Komatsuzaki et al.,
arXiv 2212.05055), for every router, with top-any gates taken from the dense model.

Every expert of an MoE block starts as a copy of that block's dense FFN; attention,
norms, stem and head are copied. Logit routers (top-k, top-p, DA-MoE) keep their
small random init. Top-any's gate embeddings are the spherical k-means centroids of
the dense model's FFN inputs at that block, and its thresholds are set so that the
mean number of active experts on those inputs is the target (the experts per token
top-any's capacity is sized for: model.moe.top_any.expected_k, or the budget's
budget.target_experts_per_token).

Why the upcycled model computes what the dense model did (before any noise): its
experts are identical, so its MoE output is sum_e w_e FFN(x) = FFN(x) whenever a
token's combine weights sum to 1 and none of its pairs is dropped. Top-k with
renormalised weights: k weights that sum to 1. Top-any in evaluation: weight 1/K on
each of its K active experts, or 1 on its top-1 expert when none is active (in
training such a token gets no expert, so training-mode outputs differ).

Fine-grained experts (`partition`): expert e takes the dense hidden units
e·F .. e·F+F-1 (mod the dense width H), its output weights scaled by H/F; the
output is then an unbiased estimate of the dense FFN under uniform expert choice,
not equal to it.

`upcycle_params` is the library function for users with their own loops;
`train.init_from.from_checkpoint` is what `--config.init_from=DIR` runs.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np

from dynmoe_jax import layers, names, routers

DENSE_ACTIVATION = 'gelu'  # the dense FFN's activation (models.transformer.Block)


class UpcycleError(ValueError):
  """The dense checkpoint cannot start this MoE model."""


def spherical_kmeans(inputs: np.ndarray, num_clusters: int, *, iterations: int = 20,
                     seed: int = 0) -> np.ndarray:
  """Unit-norm centroids [num_clusters, D] of the directions of `inputs` [N, D]
  (cosine k-means, k-means++ seeding). Top-any scores tokens by cosine similarity,
  so its gate embeddings are clustered by direction, not by position."""
  x = inputs / np.maximum(np.linalg.norm(inputs, axis=-1, keepdims=True), 1e-12)
  n = x.shape[0]
  if n < num_clusters:
    raise UpcycleError(f'k-means of {n} router inputs into {num_clusters} experts: more '
                       'batches are needed (upcycle.kmeans_batches)')
  rng = np.random.default_rng(seed)
  centroids = [x[rng.integers(n)]]
  for _ in range(1, num_clusters):
    distance = 1.0 - np.max(x @ np.stack(centroids).T, axis=1)  # cosine distance
    p = np.maximum(distance, 0.0)
    centroids.append(x[rng.choice(n, p=p / p.sum())] if p.sum() > 0 else x[rng.integers(n)])
  centroids = np.stack(centroids)
  for _ in range(iterations):
    assign = np.argmax(x @ centroids.T, axis=1)
    for c in range(num_clusters):
      members = x[assign == c]
      if len(members):  # an empty cluster keeps its centroid
        total = members.sum(0)
        centroids[c] = total / max(np.linalg.norm(total), 1e-12)
  return centroids


def _expert_weights(wi: np.ndarray, wo: np.ndarray, num_experts: int, hidden: int,
                    partition: bool, noise: float, rng: np.random.Generator):
  dense_hidden = wi.shape[1]
  if partition:
    units = (np.arange(num_experts)[:, None] * hidden + np.arange(hidden)[None]) % dense_hidden
    expert_wi = np.stack([wi[:, u] for u in units])
    expert_wo = np.stack([wo[u] for u in units]) * (dense_hidden / hidden)
  else:
    expert_wi = np.broadcast_to(wi, (num_experts,) + wi.shape).copy()
    expert_wo = np.broadcast_to(wo, (num_experts,) + wo.shape).copy()
  if noise:
    expert_wi = expert_wi + noise * wi.std() * rng.standard_normal(expert_wi.shape)
    expert_wo = expert_wo + noise * wo.std() * rng.standard_normal(expert_wo.shape)
  return expert_wi.astype(wi.dtype), expert_wo.astype(wo.dtype)


def upcycle_params(dense_params: Mapping[str, Any], moe_params: Mapping[str, Any], *,
                   moe_settings: Mapping[str, Any],
                   router_inputs: Optional[Mapping[str, np.ndarray]] = None,
                   partition: bool = False, noise: float = 0.0, seed: int = 0,
                   kmeans_iterations: int = 20) -> Dict[str, Any]:
  """Dense params -> params of an MoE model of the same shape.

  dense_params: a dense `MoETransformer`'s params (no FFN biases: experts have none).
  moe_params: a fresh init of the MoE model (`model.init(...)['params']`, unboxed): it
    gives the shapes and the logit routers' init.
  moe_settings: `layers.MoE` fields (`config_lib.moe_kwargs(config)`): router (a name or
    settings object), activation, glu; absent ones take the layer's defaults.
  router_inputs: {MoE block name: [N, D] dense FFN inputs at that block}, for routers
    whose gates are set from data (top-any; see `router_inputs`).
  partition / noise / seed: see the module docstring; noise is the std of Gaussian
    noise added to each expert weight, relative to the dense weight's std.
  """
  dense_params = jax.device_get(dense_params)
  moe_params = jax.device_get(moe_params)
  # Fields the caller leaves out take `layers.MoE`'s defaults.
  settings = {**{name: getattr(layers.MoE, name) for name in ('router', 'activation', 'glu')},
              **dict(moe_settings)}
  spec, router = routers.resolve(settings['router'])
  if settings['activation'] != DENSE_ACTIVATION or settings['glu']:
    field = 'glu' if settings['glu'] else 'activation'
    raise UpcycleError(f'model.moe.{field}={settings[field]!r}: experts copied from a dense '
                       f'FFN must be ungated {DENSE_ACTIVATION!r} FFNs like it')
  rng = np.random.default_rng(seed)
  blocks = moe_blocks(moe_params)
  for name in blocks:
    block = dense_params.get(name, {})
    if any('bias' in block.get(part, {}) for part in ('wi', 'wo')):
      raise UpcycleError(f'the dense FFN of {name} has biases, which experts do not: train '
                         'the dense model with model.ffn_bias=False')
  out: Dict[str, Any] = {}
  for name, fresh in moe_params.items():
    if name not in dense_params:
      raise UpcycleError(f'the dense params have no {name!r}')
    if name not in blocks:
      _check_same_shapes(name, dense_params[name], fresh)
      out[name] = dense_params[name]
      continue
    block = dense_params[name]
    if 'moe' in block:
      raise UpcycleError(f'{name} of the dense params is already an MoE block')
    moe = dict(fresh['moe'])
    num_experts, _, hidden = moe['wi'].shape
    dense_hidden = block['wi']['kernel'].shape[1]
    if hidden != dense_hidden and not (partition and hidden < dense_hidden):
      raise UpcycleError(
          f'model.moe.hidden_dim={hidden} differs from the dense mlp_dim={dense_hidden}: '
          'experts copy the dense FFN whole, or with upcycle.partition=True split its hidden '
          'units (hidden_dim < mlp_dim)')
    moe['wi'], moe['wo'] = _expert_weights(
        np.asarray(block['wi']['kernel']), np.asarray(block['wo']['kernel']), num_experts,
        hidden, partition, noise, rng)
    if spec.upcycle_router is not None:
      if router_inputs is None or name not in router_inputs:
        raise UpcycleError(f'router {spec.name!r} sets its gates from the dense '
                           f"model's FFN inputs: pass router_inputs[{name!r}]")
      kmeans = lambda x, k: spherical_kmeans(x, k, iterations=kmeans_iterations, seed=seed)
      moe.update(spec.upcycle_router(
          {k: np.asarray(v) for k, v in moe.items() if routers.is_router_param(k)},
          np.asarray(router_inputs[name], np.float64), float(router.capacity_k(num_experts)),
          kmeans))
    rest = {k: v for k, v in block.items() if k not in ('wi', 'wo')}
    _check_same_shapes(name, rest, {k: v for k, v in fresh.items() if k != 'moe'})
    out[name] = {**rest, 'moe': {k: np.asarray(v, np.asarray(fresh['moe'][k]).dtype)
                                 for k, v in moe.items()}}
  return out


def moe_blocks(params: Mapping[str, Any]) -> list:
  """Names of the blocks of `params` that hold an MoE module, in block order."""
  return sorted((name for name, p in params.items() if isinstance(p, Mapping) and 'moe' in p),
                key=names.layer_index)


def _check_same_shapes(name: str, dense, fresh):
  def shapes(tree):
    return {'/'.join(str(getattr(k, 'key', k)) for k in path): np.shape(leaf)
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  a, b = shapes(dense), shapes(fresh)
  differ = [f'{name}/{p} (dense: {a.get(p, "absent")}, MoE model: {b.get(p, "absent")})'
            for p in sorted(set(a) | set(b)) if a.get(p) != b.get(p)]
  if differ:
    raise UpcycleError('the dense params do not fit the MoE model: ' + ', '.join(differ))


def router_inputs(dense_model, dense_params, batches: Iterable[Any],
                  blocks: Sequence[str]) -> Dict[str, np.ndarray]:
  """{block: [N, D]}: the dense model's FFN inputs (after `ln_ffn`) at `blocks`, over
  `batches` of model inputs, padding tokens excluded where the stem marks them (LM
  byte 0)."""
  @jax.jit
  def capture(params, inputs):
    _, state = dense_model.apply(
        {'params': params}, inputs, training=False,
        capture_intermediates=lambda module, method: module.name == 'ln_ffn')
    return {b: state['intermediates'][b]['ln_ffn']['__call__'][0] for b in blocks}

  collected: Dict[str, list] = {b: [] for b in blocks}
  for inputs in batches:
    got = jax.device_get(capture(dense_params, inputs))
    keep = (np.asarray(inputs) > 0).reshape(-1) if dense_model.stem == 'embed' else None
    for b in blocks:
      flat = np.asarray(got[b], np.float64).reshape(-1, got[b].shape[-1])
      collected[b].append(flat if keep is None else flat[keep])
  return {b: np.concatenate(v) for b, v in collected.items()}
