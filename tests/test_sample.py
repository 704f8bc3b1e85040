"""Generation with a KV cache: cached decoding equals the full forward pass; the CLI."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import sample
from tests.test_decoder import lm, tokens


# (0, 4): the cache through an MoE block and a dense one
@pytest.mark.parametrize('experts', [(0, 4)])
def test_cached_decoding_equals_the_full_forward_pass(experts):
  model = lm(experts, max_len=16)
  x = tokens(1, 12)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), x)['params'])
  full = jax.jit(model.apply)({'params': params}, x)[0]
  step = model.clone(decode=True)
  cache = jax.jit(step.init)(jax.random.PRNGKey(0), x[:, :1])['cache']
  decode = jax.jit(lambda cache, x: step.apply({'params': params, 'cache': cache}, x,
                                               mutable=['cache']))
  # A prompt of 5 positions in one call, then one position per call.
  (logits, _), state = decode(cache, x[:, :5])
  got = [logits]
  cache = state['cache']
  for t in range(5, 12):
    (logits, _), state = decode(cache, x[:, t:t + 1])
    cache = state['cache']
    got.append(logits)
  np.testing.assert_allclose(jnp.concatenate(got, 1), full, rtol=2e-5, atol=2e-5)


def test_generate_is_greedy_at_temperature_zero_and_counts_experts():
  model = lm((0, 4), max_len=32).clone(decode=True)
  params = nn.meta.unbox(jax.jit(lm((0, 4)).init)(jax.random.PRNGKey(0), tokens())['params'])
  prompt = sample.encode('def f(')
  out, experts = sample.generate(model, params, prompt, 10, temperature=0.0)
  assert out.shape == (16,) and experts.shape == (16, 1)
  np.testing.assert_array_equal(out[:6], prompt)
  assert (experts[:-1] >= 1).all() and experts[-1, 0] == -1  # eval mode: >= 1 expert
  # Greedy: each new token is the argmax of the full forward pass over what precedes it.
  full = jax.jit(lm((0, 4), max_len=32).apply)({'params': params}, jnp.asarray(out)[None])[0][0]
  for i in range(6, 16):
    assert out[i] == int(jnp.argmax(full[i - 1].at[0].set(-jnp.inf)))
  with pytest.raises(ValueError, match='exceeds the model'):
    sample.generate(model, params, prompt, 40)
  text, key, page = sample.render(out, experts, len(prompt))
  assert 'def f(' in sample.decode_bytes(out).decode('utf-8', 'replace')
  assert page.count('<span') >= 16 and '\033[1m' in text and 'colour key' in key
  plain, key, _ = sample.render(out, experts, len(prompt), colour=False)
  assert len(plain) == len(out) and '\033' not in plain and not key  # one char a byte


def test_generate_routes_with_a_budgets_controls():
  from dynmoe_jax import routers
  from dynmoe_jax.capacity import Capacity
  from dynmoe_jax.models import decoder
  from tests.test_decoder import V
  moe = dict(router=routers.TopP(p=0.5), hidden_dim=32, glu=True, activation='silu',
             capacity=Capacity(factor=8.0, eval_factor=8.0))
  model = decoder.DecoderLM(num_layers=2, dim=32, num_heads=2, mlp_dim=64,
                            experts_per_layer=(0, 4), moe=moe, vocab_size=V, max_len=32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens())['params'])
  prompt = sample.encode('def f(')
  counts = {}
  for p in (1e-3, 1.0):  # top-1 for every token / every expert of 4
    _, experts = sample.generate(model.clone(decode=True), params, prompt, 4, temperature=0.0,
                                 moe_controls={'layer_1': {'p': jnp.float32(p)}})
    counts[p] = experts[:-1, 0]
  assert (counts[1e-3] == 1).all() and (counts[1.0] == 4).all()


@pytest.mark.slow
def test_sample_command_on_a_trained_run(tmp_path, capsys, monkeypatch):
  from dynmoe_jax import train
  from tests.conftest import load_config, snapshot
  config = load_config('lm_tiny')
  config.model.arch = 'decoder'
  config.model.max_len = 64
  train.Trainer(config, str(tmp_path)).run()
  # a relative --workdir, as the README's command after `make train` passes one
  monkeypatch.chdir(tmp_path.parent)
  before = snapshot(tmp_path)
  assert sample.main([f'--workdir={tmp_path.name}', '--prompt=import ', '--max_new=20']) == 0
  out = capsys.readouterr().out
  assert 'experts per token by MoE layer' in out
  assert '\033[' not in out  # a pipe gets no colour codes
  # the run is only read
  assert snapshot(tmp_path) == before
  page = tmp_path.parent / 'sample.html'
  assert sample.main([f'--workdir={tmp_path.name}', '--max_new=5', f'--html={page}',
                      '--colour=always']) == 0
  out = capsys.readouterr().out
  assert 'colour key, experts per token' in out and '\033[' in out
  assert page.read_text().startswith('<!doctype html>')
  assert sample.main([f'--workdir={tmp_path / "nothing"}']) == 2
