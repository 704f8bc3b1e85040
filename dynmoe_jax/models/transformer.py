"""Pre-LN transformer with MoE FFN blocks: sequence classifier and causal byte LM.

Shape letters: B batch, S sequence, D width, H heads. Which blocks are MoE and
how many experts each has is `experts_per_layer` (0 = dense FFN), a static
tuple: adaptive training changes it and rebuilds the model. Every block hands
its attention probabilities to its MoE so the DA-MoE router ('adaptive_k') can
give important tokens more experts.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from dynmoe_jax import flops, layers, names

STEMS = ('conv1d', 'patch', 'embed')
TASKS = ('classify', 'lm')
POOLS = ('mean', 'cls')


def dense(features, axes, dtype, param_dtype, name=None, use_bias=True):
  return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                  kernel_init=nn.with_logical_partitioning(nn.initializers.xavier_uniform(), axes),
                  bias_init=nn.with_logical_partitioning(nn.initializers.zeros, (axes[-1],)),
                  name=name)


def layer_norm(dtype, name=None):
  return nn.LayerNorm(dtype=dtype, name=name,
                      scale_init=nn.with_logical_partitioning(nn.initializers.ones, ('embed',)),
                      bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))


class SelfAttention(nn.Module):
  """Multi-head self-attention that also returns its probabilities [B, H, S, S]."""
  num_heads: int
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, attention_mask, training: bool):
    width = x.shape[-1]
    if width % self.num_heads:
      raise ValueError(f'model.dim={width} must be divisible by model.num_heads={self.num_heads}')
    head_dim = width // self.num_heads

    def kernel(name, shape, axes, in_axis, out_axis):
      init = nn.initializers.variance_scaling(1.0, 'fan_avg', 'uniform', in_axis=in_axis,
                                              out_axis=out_axis)
      return self.param(name, nn.with_logical_partitioning(init, axes), shape,
                        self.param_dtype).astype(self.dtype)

    def bias(name, shape, axes):
      return self.param(name, nn.with_logical_partitioning(nn.initializers.zeros, axes), shape,
                        self.param_dtype).astype(self.dtype)

    def project(name, use_bias=True):
      w = kernel(f'{name}_kernel', (width, self.num_heads, head_dim), ('embed', 'heads', 'kv'),
                 0, (1, 2))
      out = jnp.einsum('bsd,dhk->bshk', x.astype(self.dtype), w)
      if use_bias:
        out = out + bias(f'{name}_bias', (self.num_heads, head_dim), ('heads', 'kv'))
      return out

    # No key bias: it adds the same q·b to every logit of a query, which softmax
    # ignores, so its gradient is zero and Adam would only amplify rounding noise.
    q, k, v = project('query'), project('key', use_bias=False), project('value')

    with jax.named_scope(flops.ATTENTION_SCOPE):
      logits = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) / jnp.sqrt(head_dim)
      logits = jnp.where(attention_mask, logits, jnp.finfo(jnp.float32).min)
      probs = jax.nn.softmax(logits, axis=-1)
      dropped = nn.Dropout(self.dropout)(probs, deterministic=not training)
      out = jnp.einsum('bhqk,bkhd->bqhd', dropped.astype(self.dtype), v)
    w_out = kernel('out_kernel', (self.num_heads, head_dim, width), ('heads', 'kv', 'embed'),
                   (0, 1), 2)
    out = jnp.einsum('bshk,hkd->bsd', out, w_out) + bias('out_bias', (width,), ('embed',))
    return out, probs


def token_importance(probs: jax.Array, attention_mask: jax.Array) -> jax.Array:
  """DA-MoE importance: mean over heads and (valid) queries of the attention each
  token receives. probs [B, H, S, S], attention_mask [B, 1, S, S] -> [B, S]."""
  valid_queries = attention_mask.any(axis=-1, keepdims=True)  # [B, 1, S, 1]
  received = jnp.where(valid_queries, probs, 0.0).sum(axis=2)  # [B, H, S]
  count = jnp.maximum(valid_queries.sum(axis=2), 1)             # [B, 1, 1]
  return (received / count).mean(axis=1)


def block_moe_settings(moe: Mapping[str, Any],
                       capacity_plans: Tuple[Optional[Tuple[int, int]], ...],
                       block: int) -> Mapping[str, Any]:
  """The MoE fields of block `block`: `moe`, with that block's re-planned capacity
  (`capacity.Capacity.planned`) where it has one."""
  planned = capacity_plans[block] if capacity_plans else None
  if planned is None:
    return moe
  return {**moe, 'capacity': dataclasses.replace(moe['capacity'], planned=tuple(planned))}


def stack_blocks(x, experts_per_layer: Sequence[int], moe: Mapping[str, Any],
                 capacity_plans: Tuple[Optional[Tuple[int, int]], ...],
                 moe_controls: Optional[Mapping[str, Any]],
                 make_block: Callable[[int, Mapping[str, Any], str], nn.Module],
                 apply_block: Callable[..., Tuple[jax.Array, Optional[layers.MoEAux]]]):
  """The block loop of both models, called inside their compact `__call__`: block i is
  `make_block(its experts (0: dense), its MoE fields, 'layer_<i>')`, applied as
  `apply_block(block, x, its budget controls or None)`. Returns (x, {'loss': the summed
  auxiliary loss, 'moe': {'layer_<i>': MoEAux} of the MoE blocks})."""
  moe_aux: Dict[str, layers.MoEAux] = {}
  for i, num_experts in enumerate(experts_per_layer):
    name = names.layer_name(i)
    block = make_block(num_experts, block_moe_settings(moe, capacity_plans, i), name)
    x, aux = apply_block(block, x, (moe_controls or {}).get(name))
    if aux is not None:
      moe_aux[name] = aux
  total = sum((a.loss for a in moe_aux.values()), jnp.zeros((), jnp.float32))
  return x, {'loss': total, 'moe': moe_aux}


class Block(nn.Module):
  num_heads: int
  mlp_dim: int
  num_experts: int  # 0 = dense FFN
  moe: Mapping[str, Any]
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ffn_bias: bool = True  # dense FFN biases (experts have none: upcycling needs False)

  @nn.compact
  def __call__(self, x, attention_mask, training: bool, token_mask=None, controls=None):
    h, probs = SelfAttention(self.num_heads, self.dropout, self.dtype, self.param_dtype,
                             name='attention')(layer_norm(self.dtype, 'ln_attention')(x),
                                               attention_mask, training)
    x = x + nn.Dropout(self.dropout)(h, deterministic=not training)
    h = layer_norm(self.dtype, 'ln_ffn')(x)
    aux = None
    if self.num_experts:
      moe = layers.MoE(num_experts=self.num_experts, dtype=self.dtype,
                       param_dtype=self.param_dtype, name='moe', **dict(self.moe))
      importance = (token_importance(probs, attention_mask)
                    if moe.spec.needs_token_importance else None)
      h, aux = moe(h, training=training, token_importance=importance, token_mask=token_mask,
                   controls=controls)
    else:
      h = dense(self.mlp_dim, ('embed', 'mlp'), self.dtype, self.param_dtype, 'wi',
                use_bias=self.ffn_bias)(h)
      h = dense(x.shape[-1], ('mlp', 'embed'), self.dtype, self.param_dtype, 'wo',
                use_bias=self.ffn_bias)(nn.gelu(h))
    return x + nn.Dropout(self.dropout)(h, deterministic=not training), aux


class Stem(nn.Module):
  """Raw inputs -> token embeddings [B, S, D] and a key mask [B, S]."""
  kind: str
  dim: int
  kernel_size: int = 5
  stride: int = 1
  vocab_size: int = 257
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, inputs):
    conv = lambda features, kernel, stride, name: nn.Conv(
        features, kernel, strides=stride, padding='SAME', dtype=self.dtype,
        param_dtype=self.param_dtype, name=name,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(),
                                                 (None,) * len(kernel) + (None, 'embed')),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ('embed',)))
    if self.kind == 'conv1d':  # signals [B, L] or [B, L, C]
      x = inputs[..., None] if inputs.ndim == 2 else inputs
      x = nn.gelu(conv(self.dim, (self.kernel_size,), (1,), 'conv_0')(x.astype(self.dtype)))
      x = conv(self.dim, (self.kernel_size,), (self.stride,), 'conv_1')(x)
      return x, jnp.ones(x.shape[:2], bool)
    if self.kind == 'patch':  # images [B, H, W, C]
      p = self.stride
      x = conv(self.dim, (p, p), (p, p), 'patch')(inputs.astype(self.dtype))
      x = x.reshape(x.shape[0], -1, self.dim)
      return x, jnp.ones(x.shape[:2], bool)
    embed = nn.Embed(self.vocab_size, self.dim, dtype=self.dtype, param_dtype=self.param_dtype,
                     name='embed', embedding_init=nn.with_logical_partitioning(
                         nn.initializers.normal(0.02), ('vocab', 'embed')))
    return embed(inputs), inputs > 0  # token 0 is padding


class MoEStack(nn.Module):
  """The fields both models share: the blocks' sizes, experts per block (0: dense) and
  the MoE blocks' `layers.MoE` fields."""
  num_layers: int
  dim: int
  num_heads: int
  mlp_dim: int
  experts_per_layer: Tuple[int, ...]
  moe: Mapping[str, Any]

  def check_layers(self):
    if len(self.experts_per_layer) != self.num_layers:
      raise ValueError(f'experts_per_layer has {len(self.experts_per_layer)} entries for '
                       f'{self.num_layers} layers')


class MoETransformer(MoEStack):
  """Classifier (task='classify') or causal byte LM (task='lm').

  Returns (logits, aux) with aux = {'loss': summed auxiliary loss,
  'moe': {'layer_<i>': MoEAux} for every MoE block}.
  """
  task: str
  stem: str
  # Per block: (slots, tokens) re-planned from routing, or None for the capacity rule
  # (`capacity.Capacity.planned`); empty = None everywhere.
  capacity_plans: Tuple[Optional[Tuple[int, int]], ...] = ()
  num_classes: int = 10
  vocab_size: int = 257
  max_len: int = 512
  pool: str = 'mean'
  stem_kernel: int = 5
  stem_stride: int = 1
  dropout: float = 0.0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  ffn_bias: bool = True

  @nn.compact
  def __call__(self, inputs, training: bool = False, example_mask=None, moe_controls=None):
    """example_mask [B]: rows to count (eval padding rows are 0); their tokens are routed
    nowhere, so they take no expert capacity and stay out of the MoE metrics.
    moe_controls: {MoE block name: {name: traced value}} (budget controllers: see MoE)."""
    self.check_layers()
    x, key_mask = Stem(self.stem, self.dim, self.stem_kernel, self.stem_stride,
                       self.vocab_size, self.dtype, self.param_dtype, name='stem')(inputs)
    if self.task == 'classify' and self.pool == 'cls':
      cls = self.param('cls', nn.with_logical_partitioning(nn.initializers.zeros,
                                                           (None, None, 'embed')),
                       (1, 1, self.dim), self.param_dtype)
      x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, self.dim)).astype(x.dtype), x],
                          axis=1)
      key_mask = jnp.concatenate([jnp.ones((x.shape[0], 1), bool), key_mask], axis=1)
    seq_len = x.shape[1]
    if seq_len > self.max_len:
      raise ValueError(f'sequence of {seq_len} tokens exceeds model.max_len={self.max_len}')
    pos = self.param('pos_embedding', nn.with_logical_partitioning(
        nn.initializers.normal(0.02), (None, None, 'embed')), (1, self.max_len, self.dim),
                     self.param_dtype)
    x = x + pos[:, :seq_len].astype(x.dtype)
    x = nn.Dropout(self.dropout)(x, deterministic=not training)
    attention_mask = key_mask[:, None, None, :]
    if self.task == 'lm':
      attention_mask = attention_mask & jnp.tril(jnp.ones((seq_len, seq_len), bool))
    token_mask = None if example_mask is None else jnp.broadcast_to(
        (example_mask > 0)[:, None], x.shape[:2])
    x, aux = stack_blocks(
        x, self.experts_per_layer, self.moe, self.capacity_plans, moe_controls,
        lambda num_experts, moe, name: Block(self.num_heads, self.mlp_dim, num_experts, moe,
                                             self.dropout, self.dtype, self.param_dtype,
                                             self.ffn_bias, name=name),
        lambda block, h, controls: block(h, attention_mask, training, token_mask, controls))
    x = layer_norm(self.dtype, 'ln_final')(x)
    if self.task == 'classify':
      if self.pool == 'cls':
        x = x[:, 0]
      else:
        weights = key_mask[..., None].astype(x.dtype)
        x = (x * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
      logits = dense(self.num_classes, ('embed', 'classes'), self.dtype, self.param_dtype,
                     'head')(x)
    else:
      logits = dense(self.vocab_size, ('embed', 'vocab'), self.dtype, self.param_dtype, 'head')(x)
    return logits.astype(jnp.float32), aux


def experts_per_layer(num_layers: int, moe_layers, num_experts) -> Tuple[int, ...]:
  """Expert count of each block from config values.

  moe_layers: 'all', 'every_other' (blocks 1, 3, ...), 'none', or a list of block indices.
  num_experts: an int for every MoE block, or a list with one entry per MoE block.
  """
  if isinstance(moe_layers, str):
    named = {'all': range(num_layers), 'every_other': range(1, num_layers, 2), 'none': ()}
    if moe_layers not in named:
      raise ValueError(f"model.moe_layers={moe_layers!r}: use 'all', 'every_other', 'none' or a "
                       'list of layer indices')
    indices = list(named[moe_layers])
  else:
    indices = sorted(int(i) for i in moe_layers)
    bad = [i for i in indices if not 0 <= i < num_layers]
    if bad:
      raise ValueError(f'model.moe_layers has indices {bad} outside [0, {num_layers})')
  if isinstance(num_experts, int):
    counts = [num_experts] * len(indices)
  else:
    counts = [int(n) for n in num_experts]
    if len(counts) != len(indices):
      raise ValueError(f'model.moe.num_experts_per_layer={counts} lists {len(counts)} counts '
                       f'for {len(indices)} MoE layers {indices} (model.moe_layers='
                       f'{moe_layers!r}): give one count per MoE layer')
  layout = [0] * num_layers
  for i, n in zip(indices, counts):
    layout[i] = n
  return tuple(layout)

