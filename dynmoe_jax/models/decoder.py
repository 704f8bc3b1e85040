"""A decoder-only LM of the current kind, with MoE FFN blocks: RMSNorm, rotary position
embeddings, gated (SwiGLU) FFNs and experts, causal attention through
`jax.nn.dot_product_attention` (XLA's; `attention_impl='cudnn'` for cuDNN's on GPU), an
optional always-on shared expert, tied embeddings and a remat policy.

Shape letters: B batch, S sequence, D width, H heads, K head width. The call
signature and outputs are those of `transformer.MoETransformer` (task 'lm'), so the
train and eval steps, adaptive experts, capacity re-planning and upcycling work on
either. Padding (byte 0) is trailing, so the causal mask alone keeps every real token
from seeing it.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynmoe_jax import flops, layers, routers
from dynmoe_jax.models import transformer

REMAT_POLICIES = {
    'none': None,
    'full': jax.checkpoint_policies.nothing_saveable,
    'dots': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class RMSNorm(nn.Module):
  """x / sqrt(mean(x²) + eps) · scale, computed in float32."""
  eps: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    scale = self.param('scale', nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (y * scale.astype(jnp.float32)).astype(self.dtype)


def rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
  """Rotary position embedding (RoFormer, arXiv 2104.09864), halves layout: channel i and
  i + K/2 of each head rotate by positions · base^(-2i/K). x [B, S, H, K], positions [S]."""
  half = x.shape[-1] // 2
  inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) * 2.0 / x.shape[-1])
  angles = positions.astype(jnp.float32)[:, None] * inv_freq[None, :]    # [S, K/2]
  cos, sin = jnp.cos(angles)[None, :, None, :], jnp.sin(angles)[None, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _kernel(module, name, shape, axes, in_axis, out_axis):
  init = nn.initializers.variance_scaling(1.0, 'fan_in', 'truncated_normal', in_axis=in_axis,
                                          out_axis=out_axis)
  return module.param(name, nn.with_logical_partitioning(init, axes), shape,
                      module.param_dtype).astype(module.dtype)


class CausalAttention(nn.Module):
  """Causal self-attention with rotary embeddings. decode=True keeps keys and values of
  the positions seen so far in the 'cache' collection (cache_len of them): each call
  appends its S positions and attends to everything cached up to each query."""
  num_heads: int
  rope_base: float = 10000.0
  implementation: Optional[str] = None  # 'xla' | 'cudnn' | None (JAX picks)
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    if width % self.num_heads or (width // self.num_heads) % 2:
      raise ValueError(f'model.dim={width} / model.num_heads={self.num_heads} must be an even '
                       'head width (rotary embeddings rotate channel pairs)')
    head = width // self.num_heads
    project = lambda name: jnp.einsum('bsd,dhk->bshk', x, _kernel(
        self, name, (width, self.num_heads, head), ('embed', 'heads', 'kv'), 0, (1, 2)))
    q, k, v = project('query'), project('key'), project('value')
    if not self.decode:
      positions = jnp.arange(x.shape[1])
      q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
      with jax.named_scope(flops.ATTENTION_SCOPE):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True,
                                           implementation=self.implementation)
    else:
      out = self._attend_cached(q, k, v)
    w_out = _kernel(self, 'out', (self.num_heads, head, width), ('heads', 'kv', 'embed'),
                    (0, 1), 2)
    return jnp.einsum('bshk,hkd->bsd', out, w_out)

  def _attend_cached(self, q, k, v):
    batch, length = q.shape[0], q.shape[1]
    shape = (batch, self.cache_len) + q.shape[2:]
    # Initialising creates an empty cache; only calls after it append to it.
    initialised = self.has_variable('cache', 'key')
    cached_k = self.variable('cache', 'key', jnp.zeros, shape, k.dtype)
    cached_v = self.variable('cache', 'value', jnp.zeros, shape, v.dtype)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    start = index.value
    positions = start + jnp.arange(length)
    q, k = rotary(q, positions, self.rope_base), rotary(k, positions, self.rope_base)
    keys = jax.lax.dynamic_update_slice(cached_k.value, k, (0, start, 0, 0))
    values = jax.lax.dynamic_update_slice(cached_v.value, v, (0, start, 0, 0))
    if initialised:
      cached_k.value, cached_v.value, index.value = keys, values, start + length
    visible = jnp.arange(self.cache_len)[None, :] <= positions[:, None]   # [S, L]
    return jax.nn.dot_product_attention(q, keys, values, mask=visible[None, None],
                                        implementation='xla')


class GatedFFN(nn.Module):
  """SwiGLU: (silu(x·wi) * (x·wi_gate))·wo."""
  hidden_dim: int
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    wi = _kernel(self, 'wi', (width, self.hidden_dim), ('embed', 'mlp'), 0, 1)
    gate = _kernel(self, 'wi_gate', (width, self.hidden_dim), ('embed', 'mlp'), 0, 1)
    wo = _kernel(self, 'wo', (self.hidden_dim, width), ('mlp', 'embed'), 0, 1)
    return (nn.silu(x @ wi) * (x @ gate)) @ wo


class DecoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  num_experts: int  # 0 = dense FFN
  moe: Mapping[str, Any]
  shared_expert: bool = False
  rope_base: float = 10000.0
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  decode: bool = False
  cache_len: int = 0

  @nn.compact
  def __call__(self, x, training: bool, token_mask=None, controls=None):
    norm = lambda name: RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    x = x + CausalAttention(self.num_heads, self.rope_base, self.attention_impl, self.dtype,
                            self.param_dtype, self.decode, self.cache_len,
                            name='attention')(norm('norm_attention')(x))
    h = norm('norm_ffn')(x)
    aux = None
    if self.num_experts:
      moe = layers.MoE(num_experts=self.num_experts, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='moe', **dict(self.moe))
      y, aux = moe(h, training=training, token_mask=token_mask, controls=controls)
      if self.shared_expert:
        y = y + GatedFFN(moe.hidden_dim, self.dtype, self.param_dtype, name='shared_expert')(h)
    else:
      y = GatedFFN(self.mlp_dim, self.dtype, self.param_dtype, name='ffn')(h)
    return x + y, aux


class DecoderLM(transformer.MoEStack):
  """Causal byte LM. Returns (logits [B, S, V], {'loss': summed auxiliary loss,
  'moe': {'layer_<i>': MoEAux}}), as `transformer.MoETransformer` does."""
  capacity_plans: Tuple[Optional[Tuple[int, int]], ...] = ()
  vocab_size: int = 257
  shared_expert: bool = False
  tie_embeddings: bool = True
  rope_base: float = 10000.0
  remat: str = 'none'
  attention_impl: Optional[str] = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  task: str = 'lm'
  stem: str = 'embed'  # what upcycling reads to drop padding tokens
  # Generation: keys and values of up to max_len positions cached in the 'cache'
  # collection; each call appends its positions (see `dynmoe_jax.sample`).
  decode: bool = False
  max_len: int = 512

  @nn.compact
  def __call__(self, inputs, training: bool = False, example_mask=None, moe_controls=None):
    self.check_layers()
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f'model.remat={self.remat!r} is not one of {tuple(REMAT_POLICIES)}')
    if any(self.experts_per_layer) and routers.resolve(
        self.moe['router'])[0].needs_token_importance:
      raise ValueError(f"router {self.moe['router']!r} reads attention probabilities, which "
                       "the decoder's fused attention does not produce; use model.arch="
                       "'transformer'")
    embed = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='embed', embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(1.0), ('vocab', 'embed')))
    x = embed(inputs)
    token_mask = inputs > 0
    if example_mask is not None:
      token_mask = token_mask & (example_mask > 0)[:, None]
    block_type = DecoderBlock
    if self.remat != 'none':
      block_type = nn.remat(DecoderBlock, policy=REMAT_POLICIES[self.remat],
                            static_argnums=(2,))
    x, aux = transformer.stack_blocks(
        x, self.experts_per_layer, self.moe, self.capacity_plans, moe_controls,
        lambda num_experts, moe, name: block_type(
            self.num_heads, self.mlp_dim, num_experts, moe, self.shared_expert, self.rope_base,
            self.attention_impl, self.dtype, self.param_dtype, self.decode, self.max_len,
            name=name),
        lambda block, h, controls: block(h, training, token_mask, controls))
    x = RMSNorm(dtype=self.dtype, param_dtype=self.param_dtype, name='norm_final')(x)
    if self.tie_embeddings:
      logits = embed.attend(x) / jnp.sqrt(self.dim).astype(x.dtype)
    else:
      logits = x @ _kernel(self, 'head', (self.dim, self.vocab_size), ('embed', 'vocab'), 0, 1)
    return logits.astype(jnp.float32), aux
