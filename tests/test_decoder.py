"""The decoder LM's blocks against numpy references, causality, bf16."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax.capacity import Capacity
from dynmoe_jax.models import decoder

V = 257


def lm(experts=(0, 4), **kw):
  moe = dict(router='top_any', hidden_dim=32, glu=True, activation='silu',
             capacity=Capacity(factor=8.0, eval_factor=8.0))
  return decoder.DecoderLM(num_layers=len(experts), dim=32, num_heads=2, mlp_dim=64,
                           experts_per_layer=tuple(experts), moe=moe, vocab_size=V, **kw)


def tokens(b=2, s=12, seed=0):
  return jax.random.randint(jax.random.PRNGKey(seed), (b, s), 1, V)


def test_rmsnorm_matches_numpy():
  x = np.random.default_rng(0).standard_normal((3, 5, 16)).astype(np.float32)
  norm = decoder.RMSNorm()
  params = norm.init(jax.random.PRNGKey(0), x)
  scale = np.linspace(0.5, 2.0, 16).astype(np.float32)
  params = {'params': {'scale': nn.meta.unbox(params)['params']['scale'] * 0 + scale}}
  want = x / np.sqrt((x ** 2).mean(-1, keepdims=True) + 1e-6) * scale
  np.testing.assert_allclose(norm.apply(params, x), want, rtol=1e-5, atol=1e-6)


def np_rotary(x, positions, base=10000.0):
  out = np.array(x, np.float64)
  half = x.shape[-1] // 2
  for s, p in enumerate(positions):
    for i in range(half):
      theta = p * base ** (-2.0 * i / x.shape[-1])
      a, b = x[:, s, :, i], x[:, s, :, i + half]
      out[:, s, :, i] = a * np.cos(theta) - b * np.sin(theta)
      out[:, s, :, i + half] = b * np.cos(theta) + a * np.sin(theta)
  return out


def test_rotary_matches_numpy_and_scores_depend_on_offsets_only():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((2, 7, 3, 8)).astype(np.float32)
  positions = np.arange(7)
  np.testing.assert_allclose(decoder.rotary(x, jnp.asarray(positions)), np_rotary(x, positions),
                             rtol=1e-5, atol=1e-5)
  q, k = rng.standard_normal((1, 1, 1, 8)), rng.standard_normal((1, 1, 1, 8))
  score = lambda m, n: float(np.sum(np_rotary(q, [m]) * np_rotary(k, [n])))
  assert score(5, 2) == pytest.approx(score(13, 10), rel=1e-6)
  assert score(5, 2) != pytest.approx(score(5, 3), rel=1e-3)


# (0, 4): a dense block and an MoE block, each checked
@pytest.mark.parametrize('experts', [(0, 4)])
def test_no_token_sees_the_future(experts):
  # d logits[:, t] / d (the embedding of position j) is zero for every j > t and not for
  # j <= t (MoE capacity is generous here: with drops, a later token could take an
  # earlier one's slot).
  model = lm(experts)
  x = tokens()
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x)['params']  # its apply is jitted too

  def logits_at(delta, t):
    def add_delta(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, nn.Embed) and context.method_name == '__call__':
        return out + delta
      return out
    with nn.intercept_methods(add_delta):
      logits = model.apply({'params': params}, x, training=True)[0]
    return jnp.take(logits, t, axis=1).sum()

  grad_at = jax.jit(jax.grad(logits_at))  # one program for every position t
  for t in (0, 5, 10):
    grad = grad_at(jnp.zeros((*x.shape, 32)), t)
    per_position = np.abs(np.asarray(grad)).sum(axis=(0, 2))
    assert np.all(per_position[t + 1:] == 0), t
    assert np.all(per_position[:t + 1] > 0), t


def test_bf16_step_is_finite_and_close_to_float32():
  x = tokens(4, 16)
  loss = lambda model: lambda p: optax_ce(model.apply({'params': p}, x, training=True), x)
  f32, bf16 = lm(), lm(dtype=jnp.bfloat16)
  params = nn.meta.unbox(jax.jit(f32.init)(jax.random.PRNGKey(0), x)['params'])
  l32, g32 = jax.jit(jax.value_and_grad(loss(f32)))(params)
  l16, g16 = jax.jit(jax.value_and_grad(loss(bf16)))(params)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(g16))
  assert jax.tree.map(lambda a: a.dtype, g16) == jax.tree.map(lambda a: a.dtype, params)
  assert abs(float(l16) - float(l32)) < 0.02 * abs(float(l32))
  # Not closer: the router sees bf16-rounded inputs, so tokens near a threshold take
  # other experts (0.985 here).
  cos = lambda a, b: float(jnp.vdot(a, b) / (jnp.linalg.norm(a) * jnp.linalg.norm(b)))
  assert cos(jnp.concatenate([g.ravel() for g in jax.tree.leaves(g16)]),
             jnp.concatenate([g.ravel() for g in jax.tree.leaves(g32)])) > 0.97


def optax_ce(out, x):
  logits, aux = out
  targets = jax.nn.one_hot(x[:, 1:], V)
  return -(jax.nn.log_softmax(logits[:, :-1]) * targets).sum(-1).mean() + aux['loss']


def test_remat_and_untied_head_and_shared_expert_compute_the_same_function():
  x = tokens()
  plain = lm(shared_expert=True)
  params = jax.jit(plain.init)(jax.random.PRNGKey(0), x)['params']
  assert 'shared_expert' in params['layer_1'] and 'head' not in params
  forward = lambda model: jax.jit(lambda p: model.apply({'params': p}, x, training=True)[0])
  want = forward(plain)(params)
  for policy in ('full', 'dots'):
    np.testing.assert_allclose(forward(lm(shared_expert=True, remat=policy))(params), want,
                               rtol=1e-5, atol=1e-5)
  untied = jax.eval_shape(lm(tie_embeddings=False).init, jax.random.PRNGKey(0), x)['params']
  assert untied['head'].value.shape == (32, V)


def test_routers_that_need_attention_probabilities_are_refused():
  model = decoder.DecoderLM(num_layers=2, dim=32, num_heads=2, mlp_dim=64,
                            experts_per_layer=(0, 4),
                            moe=dict(router='adaptive_k', hidden_dim=32), vocab_size=V)
  with pytest.raises(ValueError, match="'adaptive_k' reads attention probabilities"):
    model.init(jax.random.PRNGKey(0), tokens())


@pytest.mark.slow
def test_trainer_runs_the_decoder_with_capacity_replanned(tmp_path):
  from dynmoe_jax import train
  from tests.conftest import load_config
  config = load_config('lm_tiny')
  config.model.arch = 'decoder'
  config.model.moe.glu = True
  config.model.moe.activation = 'silu'
  config.model.shared_expert = True
  config.model.remat = 'full'
  config.adaptive.capacity = True
  config.adaptive.every = 10
  config.adaptive.record_steps = 4
  config.adaptive.compile_lead_steps = 2
  result = train.Trainer(config, str(tmp_path)).run()
  assert result['status'] == 'completed' and np.isfinite(result['eval']['bits_per_byte'])
  assert result['capacity_per_layer'][1] > 0


def test_decoder_config_is_checked():
  from dynmoe_jax import config_lib
  from tests.conftest import load_config
  config = load_config('lm_tiny')
  config.model.arch = 'decoder'
  config_lib.validate(config)
  for field, value, message in (('remat', 'some', 'must be one of'),
                                ('attention_impl', 'flash', 'must be one of'),
                                ('num_heads', 32, 'even head width')):
    bad = load_config('lm_tiny')
    bad.model.arch = 'decoder'
    bad.model[field] = value
    with pytest.raises(config_lib.ConfigError, match=f'config.model.{field}=.*{message}'):
      config_lib.validate(bad)
  classifier = load_config('tiny')
  classifier.model.arch = 'decoder'
  with pytest.raises(config_lib.ConfigError, match="needs model.task='lm'"):
    config_lib.validate(classifier)
