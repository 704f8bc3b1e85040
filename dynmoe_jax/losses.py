"""Auxiliary router losses: pure functions, at least float32, scalar outputs.

Shape letters: T tokens, D width, E experts.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dynmoe_jax.routing import normalize, upcast

_EPS = 1e-6


def diversity(gate_embeddings: jax.Array, expert_mask: Optional[jax.Array] = None) -> jax.Array:
  """DynMoE diversity loss (arXiv 2405.14297, official code): ||Ŵ Ŵᵀ − I||_F.

  Ŵ holds the gate embeddings [E, D] with each expert's row normalised, so the
  loss is zero exactly when the gate embeddings are orthonormal directions.
  `expert_mask` bool[E] restricts it to the experts in use.
  """
  w = normalize(upcast(gate_embeddings))
  gram = w @ w.T - jnp.eye(w.shape[0], dtype=w.dtype)
  if expert_mask is not None:
    pair = expert_mask[:, None] & expert_mask[None, :]
    gram = jnp.where(pair, gram, 0.0)
  return _safe_norm(gram)


# Below this Frobenius norm the Gram residual of normalised gate embeddings is float32
# rounding, not geometry (entries of ŴŴᵀ carry ~1e-7 error each).
DIVERSITY_FLOOR = 1e-5


def _safe_norm(x: jax.Array, floor: float = DIVERSITY_FLOOR) -> jax.Array:
  """||x||_F, taken as exactly 0 (value and gradient) below `floor`.

  The gradient of an exact norm near 0 is a unit-length direction set by whatever is
  left, here rounding noise: at the orthonormal init that noise would become full-size
  Adam steps in random directions, different on every device layout. Above the floor
  this is the reference's norm (torch.norm), so the reference's l_aux is matched.
  """
  squared = jnp.sum(x**2)
  above = squared > floor * floor
  return jnp.where(above, jnp.sqrt(jnp.where(above, squared, 1.0)), 0.0)


def simplicity(gate_embeddings: jax.Array) -> jax.Array:
  """DynMoE simplicity loss: mean_e ||W_e||_2, keeps gate embeddings bounded."""
  return jnp.mean(jnp.linalg.norm(upcast(gate_embeddings), axis=-1))


def load_balance(probs: jax.Array, mask: jax.Array) -> jax.Array:
  """Switch/GShard load-balance loss E · Σ_e f_e · P̄_e (Fedus et al. 2021, eq. 4).

  f_e is the fraction of routed (token, expert) pairs that go to expert e and
  P̄_e the mean router probability of e; the loss is 1 under uniform routing.
  """
  num_experts = probs.shape[-1]
  probs = upcast(probs)
  routed = mask.astype(probs.dtype)
  fraction = routed.sum(axis=0) / jnp.maximum(routed.sum(), 1.0)
  mean_prob = probs.mean(axis=0)
  return num_experts * jnp.sum(fraction * mean_prob)


def top_any_load_balance(gates: jax.Array, mask: jax.Array) -> jax.Array:
  """DynMoE's load balance (reference DeepSpeed variant, 2025): over the tokens that
  activated at least one expert, gates normalised per token (each active expert 1/K_t,
  differentiated through the normalisation), me_e = their mean normalised gate of e,
  ce_e = their mean mask of e; E² · mean_e(me_e · ce_e). 1 when balanced; 0 when no
  token activated an expert.

  gates: float[T, E] straight-through gate values (RouterOutput.gates); mask: bool[T, E].
  """
  gates = upcast(gates)
  num_experts = gates.shape[-1]
  total = gates.sum(axis=-1, keepdims=True)
  routed = total[:, 0] > 0
  normalized = gates / jnp.where(total > 0, total, 1.0)
  count = jnp.maximum(routed.sum(), 1).astype(gates.dtype)
  me = jnp.where(routed[:, None], normalized, 0.0).sum(axis=0) / count
  ce = jnp.where(routed[:, None], mask, False).astype(gates.dtype).sum(axis=0) / count
  return num_experts * num_experts * jnp.mean(me * ce)


def top_any_gshard_balance(gates: jax.Array, scores: jax.Array) -> jax.Array:
  """GShard's load balance on top-any's binary scores (the reference's DomainBed runs:
  Tutel's gshard_loss fed the straight-through gates): me_e = mean over all tokens of the
  gate of e (1 where its threshold passed; gradient through the straight-through
  estimator), ce_e = the fraction of tokens whose first expert (the highest-scoring one
  that passed) is e; tokens where none passed count for no expert (a top-1 fallback
  neither). E · sum_e(me_e · ce_e): 1 when balanced with one expert per token.

  gates: float[T, E] straight-through gates (RouterOutput.gates); scores: float[T, E].
  """
  gates = upcast(gates)
  num_experts = gates.shape[-1]
  passed = gates > 0
  first = jnp.argmax(jnp.where(passed, upcast(scores), -jnp.inf), axis=-1)
  first = jax.nn.one_hot(first, num_experts, dtype=gates.dtype) * passed.any(-1, keepdims=True)
  return num_experts * jnp.sum(jnp.mean(gates, axis=0) * jnp.mean(first, axis=0))


def efficiency(gates: jax.Array) -> jax.Array:
  """DynMoE's efficiency loss (reference, 2025): mean over tokens and experts of the
  straight-through gates = mean K / E. Its gradient, through the straight-through
  estimator, raises thresholds and turns gate embeddings away from the tokens."""
  return jnp.mean(upcast(gates))


def z_loss(logits: jax.Array) -> jax.Array:
  """Router z-loss (ST-MoE, Zoph et al. 2022): mean_t logsumexp(logits_t)²."""
  return jnp.mean(jax.nn.logsumexp(upcast(logits), axis=-1) ** 2)


def router_entropy(probs: jax.Array) -> jax.Array:
  """Mean per-token entropy −Σ_e P_e log P_e of the router distribution.

  Top-p routing (arXiv 2403.07652) minimises it so the router stays confident
  and the number of experts a token needs to reach p stays small.
  """
  probs = upcast(probs)
  return jnp.mean(-jnp.sum(probs * jnp.log(probs + _EPS), axis=-1))
