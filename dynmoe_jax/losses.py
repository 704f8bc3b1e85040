"""Auxiliary router losses: pure functions, at least float32, scalar outputs.

Shape letters: T tokens, D width, E experts.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from dynmoe_jax.routing import upcast

_EPS = 1e-6


def diversity(gate_embeddings: jax.Array, expert_mask: Optional[jax.Array] = None) -> jax.Array:
  """DynMoE diversity loss (arXiv 2405.14297, official code): ||Ŵ Ŵᵀ − I||_F.

  Ŵ holds the gate embeddings [E, D] with each expert's row normalised, so the
  loss is zero exactly when the gate embeddings are orthonormal directions.
  `expert_mask` bool[E] restricts it to the experts in use.
  """
  w = upcast(gate_embeddings)
  w = w / (jnp.linalg.norm(w, axis=-1, keepdims=True) + _EPS)
  gram = w @ w.T - jnp.eye(w.shape[0], dtype=w.dtype)
  if expert_mask is not None:
    pair = expert_mask[:, None] & expert_mask[None, :]
    gram = jnp.where(pair, gram, 0.0)
  return jnp.sqrt(jnp.sum(gram**2) + _EPS)


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
