"""From an ml_collections config to a model and an optimizer, and config validation.

`validate(config)` runs before anything is traced or compiled and raises
ConfigError with the dotted field name and the allowed values, so a typo costs
a second, not a compile.
"""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import ml_collections
import optax

from dynmoe_jax import layers, routers, sharding
from dynmoe_jax.budget_settings import BalanceSettings, BudgetSettings
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.settings import SettingsError
from dynmoe_jax.data import pipeline
from dynmoe_jax.layout import Layout
from dynmoe_jax.models import decoder, transformer

ARCHS = ('transformer', 'decoder')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16, 'float16': jnp.float16}
# Keys of config.model.moe that are MoE module fields as they stand.
MOE_FIELDS = ('hidden_dim', 'dispatch_impl', 'ragged_backend', 'activation', 'glu')
NEW_EXPERT_INITS = ('fresh', 'copy_nearest')
# Float fields that 0 turns off as None does: the command line cannot set a float to None.
ZERO_MEANS_OFF = ('budget.error_unit', 'budget.horizon')


class ConfigError(ValueError):
  pass


def _fail(field: str, value: Any, allowed: str):
  raise ConfigError(f'config.{field}={value!r} is invalid: {allowed}')


def _cadence_hint(config) -> str:
  """The three boundary fields that fit a run of config.num_train_steps, as overrides."""
  a = config.adaptive
  every = max(2, config.num_train_steps // 2)
  record = max(1, min(a.record_steps, every // 2))
  lead = min(a.compile_lead_steps, every - record)
  off = ' '.join(f'--config.adaptive.{f}=False' for f in ('enabled', 'capacity') if a[f])
  return (f'A boundary cadence that fits sets all three: --config.adaptive.every={every} '
          f'--config.adaptive.record_steps={record} --config.adaptive.compile_lead_steps={lead} '
          f'(or no boundaries: {off})')


def off_or_float(value) -> Optional[float]:
  """The value of a ZERO_MEANS_OFF field: None when off (None or 0), else a float."""
  return float(value) if value else None


def experts_layout(config, num_experts: Optional[int] = None) -> Tuple[int, ...]:
  """Expert count per block (0 = dense) as the config asks for it; `num_experts` puts
  that count in every MoE block instead."""
  m = config.model
  moe_layers = tuple(m.moe_layer_indices) if m.moe_layer_indices else m.moe_layers
  per_layer = num_experts if num_experts is not None else (
      tuple(m.moe.num_experts_per_layer) or m.moe.num_experts)
  try:
    return transformer.experts_per_layer(m.num_layers, moe_layers, per_layer)
  except ValueError as e:
    raise ConfigError(f'config.model: {e}') from e


def experts_layout_indices(config) -> Tuple[int, ...]:
  """The blocks the config makes MoE blocks, whatever their expert counts."""
  return tuple(i for i, n in enumerate(experts_layout(config, num_experts=1)) if n)


def settings(cls, section, owner: str):
  """`cls.from_config(section)`, its error a ConfigError naming the config field."""
  try:
    return cls.from_config(section, owner)
  except SettingsError as e:
    _fail(f'{e.owner}.{e.field}', e.value, e.reason)


def router_settings(config) -> routers.RouterSettings:
  """The settings of the router config.model.moe.router names, under the budget's target
  where one is set (capacity is sized for it)."""
  moe = config.model.moe
  if moe.router not in routers.NAMES:
    _fail('model.moe.router', moe.router, f'must be one of {routers.NAMES}')
  spec = routers.get(moe.router)
  router = settings(spec.settings, moe[spec.name], f'model.moe.{spec.name}')
  target = config.budget.target_experts_per_token
  return router if target is None else router.with_budget(target)


def budget_settings(config) -> BudgetSettings:
  return settings(BudgetSettings, config.budget, 'budget')


def balance_settings(config) -> BalanceSettings:
  return settings(BalanceSettings, config.balance, 'balance')


def moe_kwargs(config) -> Dict[str, Any]:
  """`layers.MoE` fields from config.model.moe."""
  moe = config.model.moe
  return {**{k: moe[k] for k in MOE_FIELDS}, 'router': router_settings(config),
          'capacity': settings(Capacity, moe.capacity, 'model.moe.capacity')}


def build_model(config, layout: Union[None, Layout, Sequence[int]] = None):
  """The model of `layout` (a Layout, or experts per block; None: the config's): a
  `transformer.MoETransformer` or, for model.arch='decoder', a `decoder.DecoderLM`."""
  m = config.model
  layout = Layout.of(layout or experts_layout(config))
  planned = tuple(layout.capacity_plan(i) for i in range(len(layout.experts)))
  if m.arch == 'decoder':
    return decoder.DecoderLM(
        num_layers=m.num_layers, dim=m.dim, num_heads=m.num_heads, mlp_dim=m.mlp_dim,
        experts_per_layer=layout.experts, moe=moe_kwargs(config), capacity_plans=planned,
        vocab_size=m.vocab_size, shared_expert=m.shared_expert,
        tie_embeddings=m.tie_embeddings, rope_base=m.rope_base, remat=m.remat,
        attention_impl=m.attention_impl, max_len=m.max_len, dtype=DTYPES[m.dtype],
        param_dtype=DTYPES[m.param_dtype])
  return transformer.MoETransformer(
      task=m.task, stem=m.stem, num_layers=m.num_layers, dim=m.dim, num_heads=m.num_heads,
      mlp_dim=m.mlp_dim, experts_per_layer=layout.experts,
      capacity_plans=planned,
      moe=moe_kwargs(config), num_classes=m.num_classes, vocab_size=m.vocab_size,
      max_len=m.max_len, pool=m.pool, stem_kernel=m.stem_kernel, stem_stride=m.stem_stride,
      dropout=m.dropout, dtype=DTYPES[m.dtype], param_dtype=DTYPES[m.param_dtype],
      ffn_bias=m.ffn_bias)


def learning_rate_schedule(config) -> optax.Schedule:
  o = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=o.learning_rate, warmup_steps=o.warmup_steps,
      decay_steps=max(config.num_train_steps, o.warmup_steps + 1),
      end_value=o.learning_rate * o.min_lr_ratio)


def build_optimizer(config) -> optax.GradientTransformation:
  o = config.optimizer
  chain = []
  if o.grad_clip_norm:
    chain.append(optax.clip_by_global_norm(o.grad_clip_norm))
  chain.append(optax.adamw(learning_rate_schedule(config), b1=o.b1, b2=o.b2, eps=o.eps,
                           weight_decay=o.weight_decay))
  return optax.chain(*chain)


def _positive_int(field, value, allow_zero=False):
  ok = isinstance(value, int) and not isinstance(value, bool) and (
      value >= 0 if allow_zero else value > 0)
  if not ok:
    _fail(field, value, 'must be an int ' + ('>= 0' if allow_zero else '> 0'))


def _one_of(field, value, allowed):
  if value not in allowed:
    _fail(field, value, f'must be one of {tuple(allowed)}')


def _positive_float(field, value):
  if not isinstance(value, (int, float)) or value <= 0:
    _fail(field, value, 'must be a number > 0')


def validate(config, num_devices: Optional[int] = None) -> Tuple[int, ...]:
  """Check every field a run depends on; return the expert layout."""
  _check_run_and_data(config)
  _check_model(config)
  layout, router, capacity = _check_moe(config)
  _check_optimizer_and_upcycle(config)
  _check_adaptive(config, layout, router, capacity)
  _check_mesh(config, num_devices)
  return layout


def _check_run_and_data(config):
  _positive_int('num_train_steps', config.num_train_steps)
  _positive_int('batch_size', config.batch_size)
  _positive_int('eval_batch_size', config.eval_batch_size)
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'keep_checkpoints'):
    _positive_int(name, config[name])

  d = config.data
  _one_of('data.kind', d.kind, pipeline.KINDS)
  _positive_int('data.seq_len', d.seq_len)
  _positive_int('data.augment_shift', d.augment_shift, allow_zero=True)


def _check_model(config):
  d, m = config.data, config.model
  _one_of('model.arch', m.arch, ARCHS)
  _one_of('model.moe.router', m.moe.router, routers.NAMES)
  _one_of('model.task', m.task, transformer.TASKS)
  _one_of('model.stem', m.stem, transformer.STEMS)
  _one_of('model.pool', m.pool, transformer.POOLS)
  _one_of('model.dtype', m.dtype, DTYPES)
  _one_of('model.param_dtype', m.param_dtype, DTYPES)
  for name in ('num_layers', 'dim', 'num_heads', 'mlp_dim', 'num_classes', 'vocab_size',
               'max_len', 'stem_kernel', 'stem_stride'):
    _positive_int(f'model.{name}', m[name])
  if m.dim % m.num_heads:
    _fail('model.num_heads', m.num_heads, f'must divide model.dim={m.dim}')
  if not 0.0 <= m.dropout < 1.0:
    _fail('model.dropout', m.dropout, 'must be in [0, 1)')
  if m.arch == 'decoder':
    if m.task != 'lm':
      _fail('model.arch', m.arch, "'decoder' is a causal LM: needs model.task='lm'")
    _one_of('model.remat', m.remat, tuple(decoder.REMAT_POLICIES))
    _one_of('model.attention_impl', m.attention_impl, (None, 'xla', 'cudnn'))
    if (m.dim // m.num_heads) % 2:
      _fail('model.num_heads', m.num_heads, f'must give an even head width (model.dim='
            f'{m.dim}): rotary embeddings rotate channel pairs')
    if routers.get(m.moe.router).needs_token_importance:
      _fail('model.moe.router', m.moe.router, "reads attention probabilities, which the "
            "decoder's fused attention does not produce: use model.arch='transformer'")
  if (m.task == 'lm') != (d.kind == 'lm'):
    _fail('model.task', m.task, f"'lm' goes with data.kind='lm' (data.kind={d.kind!r})")


def _check_moe(config):
  """The MoE section and the budget; (layout, router settings, Capacity)."""
  m = config.model
  moe = m.moe
  _one_of('model.moe.dispatch_impl', moe.dispatch_impl, layers.DISPATCH_IMPLS)
  _one_of('model.moe.ragged_backend', moe.ragged_backend, layers.RAGGED_BACKENDS)
  _one_of('model.moe.activation', moe.activation, tuple(layers.ACTIVATIONS))
  _positive_int('model.moe.hidden_dim', moe.hidden_dim)
  for name, spec in routers.REGISTRY.items():  # every section, the unused ones too
    settings(spec.settings, moe[name], f'model.moe.{name}')
  kwargs = moe_kwargs(config)
  router, capacity = kwargs['router'], kwargs['capacity']
  spec = routers.get(moe.router)
  if (m.task == 'lm' and spec.routes_across_tokens and not m.noncausal_routing):
    _fail('model.moe.router', moe.router, "lets a token's experts depend on later tokens of "
          'its routing group in a causal LM (each expert takes its top tokens over the '
          'group); set model.noncausal_routing=True to accept that')
  budget = budget_settings(config)
  if budget.enabled and spec.budget_control is None:
    _fail('budget.target_experts_per_token', budget.target_experts_per_token,
          f'is for routers with a compute budget '
          f'({[n for n, s in routers.REGISTRY.items() if s.budget_control]}), not '
          f'{moe.router!r}')
  if balance_settings(config).loss_free and not spec.selection_bias:
    _fail('balance.loss_free', True, f'needs a router that selects by score with a bias '
          f'({[n for n, s in routers.REGISTRY.items() if s.selection_bias]}), not '
          f'{moe.router!r}')
  if budget.enabled and budget.controller == 'pi' and not spec.budget_control_raises_k:
    _fail('budget.controller', 'pi', f'sets a routing threshold shared by every layer '
          f'({[n for n, s in routers.REGISTRY.items() if s.budget_control_raises_k]}); '
          f'router {moe.router!r} is priced through {spec.budget_control!r}: use '
          f"budget.controller='rate'")
  if budget.two_sided and spec.budget_control_raises_k:
    _fail('budget.two_sided', True, f'is for a budget that prices experts (a loss weight); '
          f'router {moe.router!r} adapts {spec.budget_control!r}, which moves both ways')
  layout = experts_layout(config)
  moe_blocks = experts_layout_indices(config)
  counts = tuple(moe.num_experts_per_layer) or (moe.num_experts,)
  if moe_blocks and any(not isinstance(n, int) or n < 1 for n in counts):
    _fail('model.moe.num_experts' + ('_per_layer' if moe.num_experts_per_layer else ''),
          counts if moe.num_experts_per_layer else moe.num_experts,
          f"must be >= 1 for each MoE block {moe_blocks}; for a dense model set "
          f"model.moe_layers='none'")
  for i, n in enumerate(layout):
    for field, message in (routers.check(router, capacity, n) if n else ()):
      owner, value = (('model.moe', get_field(moe, field)) if field.startswith('capacity.')
                      else (f'model.moe.{moe.router}', getattr(router, field)))
      _fail(f'{owner}.{field}', value, f'{message} (layer {i}: {n} experts)')
    if n and budget.enabled and not budget.target_experts_per_token <= n:
      _fail('budget.target_experts_per_token', budget.target_experts_per_token,
            f'must be <= the {n} experts of layer {i}')
  return layout, router, capacity


def _check_optimizer_and_upcycle(config):
  o = config.optimizer
  _positive_float('optimizer.learning_rate', o.learning_rate)
  _positive_int('optimizer.warmup_steps', o.warmup_steps, allow_zero=True)
  if o.weight_decay < 0:
    _fail('optimizer.weight_decay', o.weight_decay, 'must be >= 0')
  if not 0.0 <= o.min_lr_ratio <= 1.0:
    _fail('optimizer.min_lr_ratio', o.min_lr_ratio, 'must be in [0, 1]')
  u = config.upcycle
  if config.init_from is not None and not isinstance(config.init_from, str):
    _fail('init_from', config.init_from, 'must be a workdir path')
  if not (isinstance(u.noise, (int, float)) and u.noise >= 0):
    _fail('upcycle.noise', u.noise, 'must be a number >= 0')
  _positive_int('upcycle.kmeans_batches', u.kmeans_batches)
  _positive_int('upcycle.kmeans_iterations', u.kmeans_iterations, allow_zero=True)


def _check_adaptive(config, layout, router, capacity):
  a = config.adaptive
  if a.capacity and capacity.slots is not None:
    _fail('adaptive.capacity', True, f're-plans the slots per expert that '
          f'model.moe.capacity.slots={capacity.slots} fixes: set one')
  if a.enabled or a.capacity:
    _positive_int('adaptive.every', a.every)
    _positive_int('adaptive.record_steps', a.record_steps)
    _positive_int('adaptive.compile_lead_steps', a.compile_lead_steps, allow_zero=True)
    if a.record_steps + a.compile_lead_steps > a.every:
      _fail('adaptive.record_steps', a.record_steps,
            f'plus adaptive.compile_lead_steps={a.compile_lead_steps} must be <= '
            f'adaptive.every={a.every}. {_cadence_hint(config)}')
    counts = [n for n in layout if n]
    if not counts:
      _fail('adaptive.enabled' if a.enabled else 'adaptive.capacity', True,
            'needs at least one MoE layer (model.moe_layers)')
  if a.capacity:
    if router.fixed_slots(1, 1) is not None:
      _fail('adaptive.capacity', True, f'router {router.name!r} fixes its own capacity')
    if not 0.0 < a.capacity_quantile <= 1.0:
      _fail('adaptive.capacity_quantile', a.capacity_quantile, 'must be in (0, 1]')
    if not (isinstance(a.capacity_headroom, (int, float)) and a.capacity_headroom >= 1.0):
      _fail('adaptive.capacity_headroom', a.capacity_headroom, 'must be a number >= 1')
    if not 0.0 <= a.capacity_max_dropped < config.dropped_fraction_warning:
      _fail('adaptive.capacity_max_dropped', a.capacity_max_dropped,
            f'must be in [0, dropped_fraction_warning={config.dropped_fraction_warning})')
    if not 0.0 <= a.capacity_tolerance < 1.0:
      _fail('adaptive.capacity_tolerance', a.capacity_tolerance, 'must be in [0, 1)')
  if a.enabled:
    _positive_int('adaptive.min_experts', a.min_experts)
    _positive_int('adaptive.max_experts', a.max_experts)
    if a.min_experts > a.max_experts:
      _fail('adaptive.min_experts', a.min_experts,
            f'must be <= adaptive.max_experts={a.max_experts}')
    _one_of('adaptive.new_expert_init', a.new_expert_init, NEW_EXPERT_INITS)
    bad = [n for n in counts if not a.min_experts <= n <= a.max_experts]
    if bad:
      _fail('model.moe.num_experts', counts,
            f'must lie in [adaptive.min_experts={a.min_experts}, '
            f'adaptive.max_experts={a.max_experts}]')
  if (a.enabled or a.capacity) and a.every >= config.num_train_steps:
    _fail('adaptive.every', a.every, f'must be < num_train_steps={config.num_train_steps} '
          f'(boundaries come every adaptive.every steps; none would be reached). '
          f'{_cadence_hint(config)}')


def _check_mesh(config, num_devices):
  num_devices = jax.device_count() if num_devices is None else num_devices
  try:
    shape = sharding.mesh_shape(config.mesh.data, config.mesh.expert, config.mesh.model,
                                num_devices)
  except ValueError as e:
    raise ConfigError(f'config.mesh: {e}') from e
  data_parallel = shape[0] * shape[1]
  if config.batch_size % data_parallel:
    _fail('batch_size', config.batch_size,
          f'must be divisible by mesh.data*mesh.expert={data_parallel}')


def load_config_file(path: str, *args) -> ml_collections.ConfigDict:
  """`get_config(*args)` of a config file, as --config=path loads it."""
  import importlib.util
  import os
  if not os.path.isfile(path):
    raise ConfigError(f'config file {path!r} does not exist')
  name = 'config_' + os.path.splitext(os.path.basename(path))[0]
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(*args)


def get_field(config, dotted: str):
  """config['a']['b'] for 'a.b'."""
  node = config
  for name in dotted.split('.'):
    node = node[name]
  return node


def set_field(config, dotted: str, value):
  """config['a']['b'] = value for 'a.b', as --config.a.b=value does (types may change)."""
  *parents, leaf = dotted.split('.')
  node = config
  for name in parents:
    node = node[name]
  with node.ignore_type():
    node[leaf] = value


def to_dict(config) -> Dict[str, Any]:
  return config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
