"""dynmoe_jax.models.transformer: stems, pooling, DA-MoE importance, causality."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import routers
from dynmoe_jax.capacity import Capacity
from dynmoe_jax.models import transformer

MOE = {'hidden_dim': 8, 'router': routers.TopK(k=1),
       'capacity': Capacity(factor=8.0, eval_factor=8.0)}


def model(**kw):
  args = dict(task='classify', stem='conv1d', num_layers=2, dim=16, num_heads=2, mlp_dim=16,
              experts_per_layer=(0, 4), moe=MOE, num_classes=5, max_len=64)
  args.update(kw)
  return transformer.MoETransformer(**args)


def test_patch_stem_and_cls_pooling():
  m = model(stem='patch', stem_stride=4, pool='cls')
  images = jax.random.uniform(jax.random.PRNGKey(0), (2, 8, 8, 3))
  variables = jax.jit(m.init)(jax.random.PRNGKey(1), images)
  logits, aux = jax.jit(m.apply)(variables, images)
  assert logits.shape == (2, 5) and set(aux['moe']) == {'layer_1'}
  assert nn.meta.unbox(variables['params']['cls']).shape == (1, 1, 16)
  # cls pooling reads token 0: 4 patches + the cls token go through the blocks
  _, state = jax.jit(lambda v, x: m.apply(v, x, mutable=['intermediates']))(variables, images)
  assert state['intermediates']['layer_1']['moe']['active_experts_per_token'].shape == (2, 5)


def test_embed_stem_masks_padding_keys():
  m = model(stem='embed', vocab_size=11, experts_per_layer=(0, 0))
  ids = jnp.array([[3, 4, 5, 0, 0]])
  variables = jax.jit(m.init)(jax.random.PRNGKey(0), ids)
  apply = jax.jit(m.apply)
  # padding (id 0) is neither attended to nor pooled: more of it changes nothing
  longer = jnp.concatenate([ids, jnp.zeros((1, 3), ids.dtype)], axis=1)
  np.testing.assert_allclose(apply(variables, ids)[0], apply(variables, longer)[0],
                             rtol=1e-5, atol=1e-6)
  # and a real token in its place does change the logits
  assert not np.allclose(apply(variables, ids)[0], apply(variables, ids.at[0, 4].set(7))[0])


def test_token_importance_is_the_mean_attention_received():
  rng = np.random.RandomState(0)
  probs = rng.rand(2, 3, 4, 4).astype(np.float32)
  probs /= probs.sum(-1, keepdims=True)
  mask = np.ones((2, 1, 4, 4), bool)
  mask[1, :, 3, :] = False  # query 3 of example 1 is padding: it attends to nothing
  got = transformer.token_importance(jnp.asarray(probs), jnp.asarray(mask))
  want = np.stack([probs[0].sum(1).mean(0) / 4, probs[1, :, :3].sum(1).mean(0) / 3])
  np.testing.assert_allclose(got, want, rtol=1e-6)


def test_lm_is_causal():
  m = model(task='lm', stem='embed', vocab_size=11, experts_per_layer=(0, 4))
  ids = jnp.array([[1, 2, 3, 4, 5, 6]])
  variables = jax.jit(m.init)(jax.random.PRNGKey(0), ids)  # its apply is jitted too
  embed = variables['params']['stem']['embed']['embedding']

  def logits_at(position, table):
    params = jax.tree.map(lambda x: x, variables['params'])
    params['stem']['embed']['embedding'] = table
    return jnp.take(m.apply({'params': params}, ids)[0][0], position, axis=0).sum()

  table = nn.meta.unbox(embed)
  grad_at = jax.jit(jax.grad(logits_at, argnums=1))  # one program for every position
  for position in range(ids.shape[1]):
    grad = grad_at(position, table)
    seen = np.abs(np.asarray(grad)).sum(-1) > 0
    later_ids = np.asarray(ids[0, position + 1:])
    earlier_ids = np.asarray(ids[0, :position + 1])
    assert not seen[np.setdiff1d(later_ids, earlier_ids)].any(), position


def test_experts_per_layer_from_config_values():
  assert transformer.experts_per_layer(4, 'every_other', 8) == (0, 8, 0, 8)
  assert transformer.experts_per_layer(3, [0, 2], [4, 6]) == (4, 0, 6)
  with pytest.raises(ValueError, match='lists 1 counts for 2 MoE layers'):
    transformer.experts_per_layer(4, 'every_other', [4])
