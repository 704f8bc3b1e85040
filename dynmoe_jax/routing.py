"""Routers: pure functions from router inputs to a `RouterOutput`.

Shape letters: T tokens, D model width, E experts, K experts a token may use.
Every router computes in at least float32 whatever the input dtype (bf16 routing
decisions flip on ties and rounding), is safe under jit/vmap/grad, and returns
`weights` that are exactly zero wherever `mask` is False.
"""
from __future__ import annotations

from typing import Callable, Optional, Union

import chex
import flax.struct
import jax
import jax.numpy as jnp

_EPS = 1e-6


@flax.struct.dataclass
class RouterOutput:
  """What every router returns.

  Attributes:
    mask: bool[T, E], token t is routed to expert e.
    weights: float[T, E] (float32, or float64 under x64), combine weight of each routed pair; exactly 0 off `mask`.
    scores: float[T, E], the router's per-pair confidence (softmax probability,
      or sigmoid cosine score for top-any). Used as dispatch priority and by losses.
    num_active: int32[T], experts each token is routed to (before capacity drops).
    gates: float[T, E] or None. Top-any: the straight-through gate values (forward 1
      where active, 0 elsewhere; backward the gradient of relu(s - t)), which its
      load-balance and efficiency losses act on. None for the other routers.
  """
  mask: jax.Array
  weights: jax.Array
  scores: jax.Array
  num_active: jax.Array
  gates: Optional[jax.Array] = None


def upcast(x: jax.Array) -> jax.Array:
  """At least float32: bf16/f16 inputs are promoted, float64 (x64 tests) is kept."""
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_logits(logits: jax.Array) -> jax.Array:
  if logits.ndim != 2:
    raise ValueError(f'router logits must be [tokens, experts], got shape {logits.shape}')
  return upcast(logits)


def _output(mask: jax.Array, weights: jax.Array, scores: jax.Array,
            gates: Optional[jax.Array] = None) -> RouterOutput:
  weights = jnp.where(mask, weights, 0.0)
  return RouterOutput(mask=mask, weights=weights, scores=scores,
                      num_active=mask.sum(axis=-1, dtype=jnp.int32), gates=gates)


def unrouted(route: RouterOutput) -> jax.Array:
  """bool[T]: tokens the router's own rule gave no expert. For top-any, no score above its
  threshold, whether or not a top-1 fallback then took over (evaluation,
  `train_fallback`): what adaptive experts add experts for."""
  if route.gates is None:
    return route.num_active == 0
  return ~(route.gates > 0).any(axis=-1)


def normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), as torch.nn.functional.normalize (the reference) does: exact
  for any norm above 1e-12, where `x / (||x|| + eps)` is not."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def mask_tokens(route: RouterOutput, valid: jax.Array) -> RouterOutput:
  """The same routing with tokens where `valid` bool[T] is False routed nowhere."""
  mask = route.mask & valid[:, None]
  gates = None if route.gates is None else jnp.where(valid[:, None], route.gates, 0.0)
  return _output(mask, route.weights, route.scores, gates)


def _mask_from_indices(indices: jax.Array, valid: jax.Array, num_experts: int) -> jax.Array:
  """indices int[T, K], valid bool[T, K] -> bool[T, E]."""
  one_hot = jax.nn.one_hot(indices, num_experts, dtype=jnp.bool_) & valid[..., None]
  return one_hot.any(axis=-2)


def _top(probs: jax.Array, k: int, selection_bias: Optional[jax.Array]):
  """(probabilities, indices) of each row's k experts by probability, or by probability +
  `selection_bias` [E] where one is given (the probabilities themselves unbiased)."""
  if selection_bias is None:
    return jax.lax.top_k(probs, k)
  _, idx = jax.lax.top_k(probs + upcast(selection_bias), k)
  return jnp.take_along_axis(probs, idx, axis=-1), idx


def top_k(logits: jax.Array, k: int, *, normalize: Optional[bool] = None,
          selection_bias: Optional[jax.Array] = None) -> RouterOutput:
  """Switch (k=1) / GShard (k=2) routing: softmax, then the k most probable experts.

  Args:
    logits: [T, E] router logits.
    k: experts per token, 1 <= k <= E (a Python int).
    normalize: renormalise the kept probabilities to sum to 1 per token. None (default):
      only for k >= 2, as Mixtral and MaxText do; at k = 1 the weight is the raw
      probability, as in Switch, because a renormalised single weight is p / p = 1 and
      sends the router almost no gradient from the task.
    selection_bias: [E] added to the probabilities to choose the k experts only (loss-free
      balancing, DeepSeek-V3); the combine weights stay the probabilities.
  """
  logits = _check_logits(logits)
  num_experts = logits.shape[-1]
  if not 1 <= k <= num_experts:
    raise ValueError(f'top_k: k={k} must be in [1, num_experts={num_experts}]')
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, top_idx = _top(probs, k, selection_bias)
  mask = _mask_from_indices(top_idx, jnp.ones_like(top_idx, jnp.bool_), num_experts)
  weights = probs
  if (k >= 2) if normalize is None else normalize:
    weights = probs / (top_probs.sum(axis=-1, keepdims=True) + _EPS)
  return _output(mask, weights, probs)


def top_p(logits: jax.Array, p: float, max_k: Optional[int] = None,
          selection_bias: Optional[jax.Array] = None) -> RouterOutput:
  """Top-p routing ("Harder Tasks Need More Experts", arXiv 2403.07652).

  Experts are taken in descending probability until their cumulative sum
  reaches p: sorted expert j is kept iff cumsum_j - P_j <= p, so the expert
  that crosses p is kept and the top-1 expert always is. Combine weights are the
  raw softmax probabilities (not renormalised), as in the official code.

  Args:
    logits: [T, E].
    p: threshold in (0, 1]; a traced scalar too (a compute budget's adapted p).
    max_k: optional cap on experts per token.
    selection_bias: [E] added to the probabilities to order the experts only (loss-free
      balancing): experts are taken in the biased order until their unbiased
      probabilities reach p.
  """
  logits = _check_logits(logits)
  num_experts = logits.shape[-1]
  if isinstance(p, (int, float)) and not 0.0 < p <= 1.0:
    raise ValueError(f'top_p: p={p} must be in (0, 1]')
  if max_k is not None and not 1 <= max_k <= num_experts:
    raise ValueError(f'top_p: max_k={max_k} must be in [1, num_experts={num_experts}]')
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, sorted_idx = _top(probs, num_experts, selection_bias)
  mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
  keep = mass_before <= p
  keep = keep.at[:, 0].set(True)  # guards float round-off; top-1 is kept by definition
  if max_k is not None:
    keep = keep & (jnp.arange(num_experts) < max_k)
  mask = _mask_from_indices(sorted_idx, keep, num_experts)
  return _output(mask, probs, probs)


def per_group(fn: Callable, group_size: Optional[int], stacked: bool = False) -> Callable:
  """`fn` applied to each routing group of `group_size` consecutive tokens alone.

  fn takes arrays (or pytrees, e.g. a RouterOutput) whose leading axis is tokens;
  None leaves pass through. The result's leading axis is tokens again, or, with
  `stacked`, one entry per group (for per-group losses). group_size None: fn itself.
  """
  if group_size is None:
    return fn

  def grouped(*args):
    split = lambda a: a.reshape(-1, group_size, *a.shape[1:])
    out = jax.vmap(fn)(*jax.tree_util.tree_map(split, args))
    if stacked:
      return out
    return jax.tree_util.tree_map(lambda a: a.reshape(-1, *a.shape[2:]), out)
  return grouped


# Which pairs an overflowing expert keeps: 'score' the most confident, 'index' the earlier
# tokens, 'gshard' and 'batch' the peers' choice-major orders (choice_priority).
PRIORITIES = ('score', 'index', 'gshard', 'batch')


def choice_priority(scores: jax.Array, mask: jax.Array, order: str) -> jax.Array:
  """Token-choice overflow orders of the peers, as an int32[T, E] priority (higher keeps a
  pair first when an expert overflows; ties cannot occur).

  'gshard': every token's first choice before any second choice, each choice by token
    index (GShard; flaxformer and V-MoE without batch priority).
  'batch': the same choice-major order, each choice by the token's top-1 score,
    highest first, ties by token index (V-MoE's and flaxformer's batch priority routing).
  A token's choices are its routed experts by descending score (ties: lower expert).

  Args:
    scores: float[T, E] the router's scores (probabilities for the softmax routers).
    mask: bool[T, E] the routed pairs.
    order: 'gshard' or 'batch'.
  """
  num_tokens = scores.shape[0]
  ranked = jnp.where(mask, upcast(scores), -jnp.inf)
  by_score = jnp.argsort(-ranked, axis=-1, stable=True)
  choice = jnp.argsort(by_score, axis=-1).astype(jnp.int32)  # 0: the token's first choice
  if order == 'gshard':
    position = jnp.arange(num_tokens, dtype=jnp.int32)
  elif order == 'batch':
    top1 = jnp.max(ranked, axis=-1)
    token_order = jnp.argsort(-top1, stable=True)
    position = jnp.argsort(token_order).astype(jnp.int32)
  else:
    raise ValueError(f"choice_priority: order={order!r} must be 'gshard' or 'batch'")
  return -(choice * num_tokens + position[:, None])


def cosine_similarity(tokens: jax.Array, gate_embeddings: jax.Array) -> jax.Array:
  """[T, D] x [E, D] -> [T, E] cosine similarities, in float32."""
  return normalize(upcast(tokens)) @ normalize(upcast(gate_embeddings)).T


def top_any(tokens: jax.Array, gate_embeddings: jax.Array, thresholds: jax.Array, *,
            scale: Union[float, jax.Array] = 1.0, training: bool = True,
            differentiable_normalization: bool = False,
            train_fallback: bool = False) -> RouterOutput:
  """DynMoE top-any gating (arXiv 2405.14297, official code).

  s = sigmoid(scale * cos(x_t, W_e)), t_e = sigmoid(scale * G_e); expert e is
  active for token t iff s > t_e. The gate value relu(s - t) goes through a
  straight-through sign: forward 1 where active, backward d relu(s - t). Combine
  weights are uniform over the K_t active experts (gate / max(K_t, 1)), with K_t a
  constant for the gradient, as in the reference's DeepSpeed variant;
  `differentiable_normalization=True` divides by the sum of the straight-through gates
  instead, as its Tutel variant does: the same forward values (that sum is K_t), with the
  gradient of the normalisation.

  In training a token may activate no expert: it gets zero MoE output (the
  residual carries it) and `num_active == 0` records it. In evaluation such a
  token falls back to its top-1 expert by score, with weight 1; with
  `train_fallback=True` it does in training too, and the weight 1 is straight-through
  s / s, so the task gradient reaches that expert's score: without it a token whose
  scores all fall below the thresholds gets no gradient that could bring one back
  (relu passes none below 0), and a layer can die (experiments/results/lm_small.md). The
  straight-through `gates` stay 0 for fallback pairs: they record what the thresholds
  chose.

  Args:
    tokens: [T, D] router inputs.
    gate_embeddings: [E, D] learned gate embeddings W.
    thresholds: [E] trainable thresholds G (pre-sigmoid).
    scale: temperature applied to cosine similarity and thresholds (a float, or a traced
      scalar when it is learned).
    training: selects the zero-expert behaviour described above (Python bool).
    train_fallback: the evaluation fallback in training too (Python bool).
  """
  if tokens.ndim != 2 or gate_embeddings.ndim != 2:
    raise ValueError(f'top_any: tokens [T, D] and gate_embeddings [E, D] expected, got '
                     f'{tokens.shape} and {gate_embeddings.shape}')
  num_experts, dim = gate_embeddings.shape
  if tokens.shape[-1] != dim:
    raise ValueError(f'top_any: token width {tokens.shape[-1]} != gate embedding width {dim}')
  chex.assert_shape(thresholds, (num_experts,))
  scores = jax.nn.sigmoid(scale * cosine_similarity(tokens, gate_embeddings))
  expert_thresholds = jax.nn.sigmoid(scale * upcast(thresholds))
  gate = jax.nn.relu(scores - expert_thresholds[None, :])
  mask = gate > 0
  gate_st = gate + jax.lax.stop_gradient(jnp.sign(gate) - gate)
  num_active = mask.sum(axis=-1, keepdims=True)
  denominator = (gate_st.sum(axis=-1, keepdims=True) if differentiable_normalization
                 else num_active.astype(gate_st.dtype))
  weights = gate_st / jnp.maximum(denominator, 1)
  if train_fallback or not training:
    fallback = jax.nn.one_hot(jnp.argmax(scores, axis=-1), num_experts, dtype=jnp.bool_)
    unrouted = num_active == 0
    mask = jnp.where(unrouted, fallback, mask)
    # exactly 1, with the gradient of the score (scores are sigmoids: > 0)
    unit = scores / jnp.maximum(jax.lax.stop_gradient(scores), 1e-30)
    weights = jnp.where(unrouted, jnp.where(fallback, unit, 0.0), weights)
  return _output(mask, weights, scores, gate_st)


def importance_to_k(importance: jax.Array, max_k: int) -> jax.Array:
  """DA-MoE: K_t = clip(ceil(importance_t / max importance * max_k), 1, max_k).

  The maximum is taken over the last axis (the sequence), so each sequence's
  most important token gets `max_k` experts.

  Args:
    importance: float[..., S] non-negative token importance.
    max_k: largest number of experts per token (Python int).
  Returns: int32[..., S].
  """
  importance = upcast(importance)
  peak = jnp.max(importance, axis=-1, keepdims=True)
  ratio = importance / jnp.maximum(peak, _EPS)
  return jnp.clip(jnp.ceil(ratio * max_k), 1, max_k).astype(jnp.int32)


def adaptive_k(logits: jax.Array, k_per_token: jax.Array, max_k: int) -> RouterOutput:
  """DA-MoE (arXiv 2409.06669): token t takes its top K_t experts, 1 <= K_t <= max_k.

  Weights are the softmax probabilities renormalised over the chosen experts, except
  for a token with K_t = 1, which keeps its raw probability (Switch): renormalised, its
  one weight would be p / p = 1 and send the router no task gradient. The paper ships no
  code; this follows its description (docs/design.md).

  Args:
    logits: [T, E].
    k_per_token: int[T] experts per token (values are clipped into [1, max_k]).
    max_k: static upper bound (Python int) <= E.
  """
  logits = _check_logits(logits)
  num_tokens, num_experts = logits.shape
  if not 1 <= max_k <= num_experts:
    raise ValueError(f'adaptive_k: max_k={max_k} must be in [1, num_experts={num_experts}]')
  chex.assert_shape(k_per_token, (num_tokens,))
  k_per_token = jnp.clip(k_per_token, 1, max_k)
  probs = jax.nn.softmax(logits, axis=-1)
  top_probs, top_idx = jax.lax.top_k(probs, max_k)
  keep = jnp.arange(max_k)[None, :] < k_per_token[:, None]
  mask = _mask_from_indices(top_idx, keep, num_experts)
  kept_mass = jnp.where(keep, top_probs, 0.0).sum(axis=-1, keepdims=True)
  denominator = jnp.where(k_per_token[:, None] == 1, 1.0, kept_mass + _EPS)
  return _output(mask, probs / denominator, probs)


def expert_choice(logits: jax.Array, capacity: int) -> RouterOutput:
  """Expert-choice routing (Zhou et al. 2022): each expert takes its `capacity`
  highest-probability tokens. A token may get any number of experts, zero included.

  Args:
    logits: [T, E].
    capacity: tokens per expert, 1 <= capacity <= T (Python int).
  """
  logits = _check_logits(logits)
  num_tokens, num_experts = logits.shape
  if not 1 <= capacity <= num_tokens:
    raise ValueError(f'expert_choice: capacity={capacity} must be in [1, num_tokens={num_tokens}]')
  probs = jax.nn.softmax(logits, axis=-1)
  _, token_idx = jax.lax.top_k(probs.T, capacity)  # [E, C]
  mask = _mask_from_indices(token_idx, jnp.ones_like(token_idx, jnp.bool_), num_tokens).T
  return _output(mask, probs, probs)

