"""Routers against straightforward numpy references and hand-made cases."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynmoe_jax import routing


def np_softmax(x):
  x = x - x.max(-1, keepdims=True)
  e = np.exp(x)
  return e / e.sum(-1, keepdims=True)


def np_sigmoid(x):
  return 1.0 / (1.0 + np.exp(-x))


def np_top_k(logits, k, normalize=True):
  probs = np_softmax(logits)
  mask = np.zeros(probs.shape, bool)
  for t in range(probs.shape[0]):
    mask[t, np.argsort(-probs[t], kind='stable')[:k]] = True
  weights = np.where(mask, probs, 0.0)
  if normalize:
    weights = weights / weights.sum(-1, keepdims=True)
  return mask, weights


def np_top_p(logits, p, max_k=None):
  probs = np_softmax(logits)
  mask = np.zeros(probs.shape, bool)
  for t in range(probs.shape[0]):
    mass = 0.0
    for rank, e in enumerate(np.argsort(-probs[t], kind='stable')):
      if mass > p or (max_k is not None and rank >= max_k):
        break
      mask[t, e] = True
      mass += probs[t, e]
  return mask, np.where(mask, probs, 0.0)


def np_top_any(tokens, gates, thresholds, scale, training):
  tn = tokens / (np.linalg.norm(tokens, axis=-1, keepdims=True) + 1e-6)
  gn = gates / (np.linalg.norm(gates, axis=-1, keepdims=True) + 1e-6)
  scores = np_sigmoid(scale * tn @ gn.T)
  mask = scores > np_sigmoid(scale * thresholds)[None]
  weights = mask / np.maximum(mask.sum(-1, keepdims=True), 1)
  if not training:
    for t in np.where(mask.sum(-1) == 0)[0]:
      mask[t, np.argmax(scores[t])] = True
      weights[t, np.argmax(scores[t])] = 1.0
  return mask, weights


def np_adaptive_k(logits, k_per_token, max_k):
  probs = np_softmax(logits)
  mask = np.zeros(probs.shape, bool)
  for t in range(probs.shape[0]):
    mask[t, np.argsort(-probs[t], kind='stable')[:min(max(k_per_token[t], 1), max_k)]] = True
  weights = np.where(mask, probs, 0.0)
  single = mask.sum(-1, keepdims=True) == 1  # one expert: its raw probability (Switch)
  return mask, np.where(single, weights, weights / weights.sum(-1, keepdims=True))


def np_expert_choice(logits, capacity):
  probs = np_softmax(logits)
  mask = np.zeros(probs.shape, bool)
  for e in range(probs.shape[1]):
    mask[np.argsort(-probs[:, e], kind='stable')[:capacity], e] = True
  return mask, np.where(mask, probs, 0.0)


def random_logits(seed, shape=(64, 8), scale=2.0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32) * scale


def assert_router_output(out, mask, weights, atol=1e-5):
  np.testing.assert_array_equal(np.asarray(out.mask), mask)
  np.testing.assert_allclose(np.asarray(out.weights), weights, atol=atol)
  np.testing.assert_array_equal(np.asarray(out.num_active), mask.sum(-1))
  # weights are exactly zero off the mask
  assert np.all(np.asarray(out.weights)[~mask] == 0.0)


class TopKTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(k=[1, 2, 3], normalize=[True, False], seed=[0, 1])
  def test_matches_numpy(self, k, normalize, seed):
    logits = random_logits(seed)
    out = self.variant(lambda l: routing.top_k(l, k, normalize=normalize))(logits)
    chex.assert_shape([out.mask, out.weights, out.scores], (64, 8))
    assert_router_output(out, *np_top_k(logits, k, normalize))

  def test_hand_made(self):
    logits = np.log(np.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]], np.float32))
    out = routing.top_k(logits, 2)
    np.testing.assert_array_equal(out.mask, [[False, True, True], [True, False, True]])
    np.testing.assert_allclose(out.weights, [[0, 2 / 3, 1 / 3], [5 / 8, 0, 3 / 8]], atol=1e-5)

  def test_k_too_large(self):
    with pytest.raises(ValueError, match='k=9'):
      routing.top_k(jnp.zeros((4, 8)), 9)


class TopPTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(p=[0.05, 0.4, 0.8, 1.0], max_k=[None, 2], seed=[0, 1])
  def test_matches_numpy(self, p, max_k, seed):
    logits = random_logits(seed, scale=1.0)
    out = self.variant(lambda l: routing.top_p(l, p, max_k))(logits)
    assert_router_output(out, *np_top_p(logits, p, max_k))

  def test_hand_made_first_crossing_kept(self):
    # sorted probs 0.5, 0.3, 0.2; p = 0.6: keep 0.5 (0 before), 0.3 (0.5 before <= 0.6), not 0.2
    logits = np.log(np.array([[0.3, 0.2, 0.5]], np.float32))
    out = routing.top_p(logits, 0.6)
    np.testing.assert_array_equal(out.mask, [[True, False, True]])
    np.testing.assert_allclose(out.weights, [[0.3, 0, 0.5]], atol=1e-6)  # raw, not renormalised
    out = routing.top_p(logits, 0.4)  # 0.5 alone already crosses 0.4
    np.testing.assert_array_equal(out.mask, [[False, False, True]])

  @parameterized.parameters(0.05, 0.4, 1.0)
  def test_a_traced_p_routes_as_the_static_one(self, p):
    # a compute budget feeds p in as a traced scalar, one program for every value
    logits = random_logits(2, scale=1.0)
    traced = jax.jit(lambda l, q: routing.top_p(l, q))(logits, jnp.float32(p))
    assert_router_output(traced, *np_top_p(logits, p))

  def test_top1_always_kept_for_tiny_p(self):
    out = routing.top_p(random_logits(3), 1e-6)
    np.testing.assert_array_equal(out.num_active, np.ones(64))

  @parameterized.parameters(0.0, -0.1, 1.5)
  def test_bad_p(self, p):
    with pytest.raises(ValueError, match='p='):
      routing.top_p(jnp.zeros((4, 8)), p)


def gradient_case(seed: int):
  """32 tokens of width 8, 4 gate embeddings, small thresholds and a cotangent for the
  [32, 4] combine weights: the inputs of top-any's gradient checks."""
  rng = np.random.RandomState(seed)
  return (jnp.asarray(rng.randn(32, 8), jnp.float32), jnp.asarray(rng.randn(4, 8), jnp.float32),
          jnp.asarray(rng.randn(4) * 0.1, jnp.float32), jnp.asarray(rng.randn(32, 4), jnp.float32))


class TopAnyTest(parameterized.TestCase):

  def test_hand_made(self):
    tokens = np.array([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0], [1.0, 1.0]], np.float32)
    gates = np.array([[1.0, 0.0], [0.0, 1.0]], np.float32)
    thresholds = np.array([0.0, 0.5], np.float32)  # expert 1 needs cos > 0.5
    out = routing.top_any(tokens, gates, thresholds, training=True)
    np.testing.assert_array_equal(out.mask, [[True, False], [False, True], [False, False],
                                             [True, True]])
    np.testing.assert_allclose(out.weights, [[1, 0], [0, 1], [0, 0], [0.5, 0.5]], atol=1e-6)
    np.testing.assert_array_equal(out.num_active, [1, 1, 0, 2])
    # evaluation: the unrouted token falls back to its best-scoring expert with weight 1
    tokens[2] = [-1.0, -0.5]
    out = routing.top_any(tokens, gates, thresholds, training=False)
    np.testing.assert_array_equal(out.mask[2], [False, True])
    np.testing.assert_allclose(out.weights[2], [0.0, 1.0])
    np.testing.assert_array_equal(out.num_active, [1, 1, 1, 2])

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(training=[True, False], scale=[1.0, 5.0], seed=[0, 1])
  def test_matches_numpy(self, training, scale, seed):
    rng = np.random.RandomState(seed)
    tokens = rng.randn(64, 16).astype(np.float32)
    gates = rng.randn(8, 16).astype(np.float32)
    thresholds = (rng.rand(8).astype(np.float32) - 0.2)
    fn = lambda *a: routing.top_any(*a, scale=scale, training=training)
    out = self.variant(fn)(tokens, gates, thresholds)
    mask, weights = np_top_any(tokens, gates, thresholds, scale, training)
    if training:
      assert mask.sum(-1).min() == 0, 'the case should include zero-expert tokens'
    assert_router_output(out, mask, weights)

  def test_straight_through_gradient(self):
    tokens, gates, thresholds, cot = gradient_case(0)

    def via_router(g, th):
      return jnp.sum(routing.top_any(tokens, g, th, scale=2.0).weights * cot)

    def expected(g, th):  # d/dθ of relu(s - t) / max(K, 1), K held constant
      s = jax.nn.sigmoid(2.0 * routing.cosine_similarity(tokens, g))
      gate = jax.nn.relu(s - jax.nn.sigmoid(2.0 * th))
      k = jax.lax.stop_gradient(jnp.maximum((gate > 0).sum(-1, keepdims=True), 1))
      return jnp.sum(gate / k * cot)

    got = jax.grad(via_router, argnums=(0, 1))(gates, thresholds)
    want = jax.grad(expected, argnums=(0, 1))(gates, thresholds)
    chex.assert_trees_all_close(got, want, atol=1e-6)
    assert float(jnp.abs(got[1]).sum()) > 0, 'thresholds must receive gradient'

  def test_differentiable_normalization_changes_gradients_not_values(self):
    # The Tutel variant: weights = g_st / sum(g_st), whose forward value is g_st / K.
    tokens, gates, thresholds, cot = gradient_case(1)
    route = lambda g, th, d: routing.top_any(tokens, g, th, scale=2.0,
                                             differentiable_normalization=d)
    chex.assert_trees_all_close(route(gates, thresholds, True).weights,
                                route(gates, thresholds, False).weights, atol=1e-7)

    def via_router(g, th):
      return jnp.sum(route(g, th, True).weights * cot)

    def expected(g, th):  # straight-through gates, then the differentiable normalisation
      s = jax.nn.sigmoid(2.0 * routing.cosine_similarity(tokens, g))
      gate = jax.nn.relu(s - jax.nn.sigmoid(2.0 * th))
      st = gate + jax.lax.stop_gradient(jnp.sign(gate) - gate)
      return jnp.sum(st / jnp.maximum(st.sum(-1, keepdims=True), 1) * cot)

    got = jax.grad(via_router, argnums=(0, 1))(gates, thresholds)
    chex.assert_trees_all_close(got, jax.grad(expected, argnums=(0, 1))(gates, thresholds),
                                atol=1e-6)
    constant_k = jax.grad(lambda g, th: jnp.sum(route(g, th, False).weights * cot),
                          argnums=(0, 1))(gates, thresholds)
    assert not np.allclose(got[1], constant_k[1])

  def test_bf16_inputs_route_in_float32(self):
    rng = np.random.RandomState(0)
    tokens = jnp.asarray(rng.randn(16, 8), jnp.bfloat16)
    out = routing.top_any(tokens, jnp.asarray(rng.randn(4, 8), jnp.bfloat16),
                          jnp.zeros((4,), jnp.bfloat16))
    assert out.weights.dtype == jnp.float32 and out.scores.dtype == jnp.float32

  def test_width_mismatch(self):
    with pytest.raises(ValueError, match='width'):
      routing.top_any(jnp.ones((4, 8)), jnp.ones((3, 6)), jnp.zeros((3,)))


class AdaptiveKTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(max_k=[1, 3, 8], seed=[0, 1])
  def test_matches_numpy(self, max_k, seed):
    logits = random_logits(seed)
    k_per_token = np.random.RandomState(seed + 7).randint(0, 10, size=64).astype(np.int32)
    out = self.variant(lambda l, kk: routing.adaptive_k(l, kk, max_k))(logits, k_per_token)
    assert_router_output(out, *np_adaptive_k(logits, k_per_token, max_k))

  def test_importance_to_k(self):
    importance = jnp.array([[0.0, 0.1, 0.5, 1.0], [2.0, 2.0, 1.0, 0.2]])
    np.testing.assert_array_equal(routing.importance_to_k(importance, 4),
                                  [[1, 1, 2, 4], [4, 4, 2, 1]])


class ExpertChoiceTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(capacity=[1, 8, 64], seed=[0, 1])
  def test_matches_numpy(self, capacity, seed):
    logits = random_logits(seed)
    out = self.variant(lambda l: routing.expert_choice(l, capacity))(logits)
    mask, weights = np_expert_choice(logits, capacity)
    assert_router_output(out, mask, weights)
    np.testing.assert_array_equal(np.asarray(out.mask).sum(0), np.full(8, capacity))

  def test_capacity_out_of_range(self):
    with pytest.raises(ValueError, match='capacity'):
      routing.expert_choice(jnp.zeros((4, 8)), 5)


@pytest.mark.parametrize('router', ['top_k', 'top_p', 'adaptive_k', 'expert_choice'])
def test_routers_vmap_over_groups(router):
  logits = jnp.asarray(np.random.RandomState(0).randn(3, 16, 8), jnp.float32)
  fns = {'top_k': lambda l: routing.top_k(l, 2),
         'top_p': lambda l: routing.top_p(l, 0.5),
         'adaptive_k': lambda l: routing.adaptive_k(l, jnp.full((16,), 2), 4),
         'expert_choice': lambda l: routing.expert_choice(l, 4)}
  batched = jax.vmap(fns[router])(logits)
  for g in range(3):
    single = fns[router](logits[g])
    chex.assert_trees_all_close(jax.tree.map(lambda a: a[g], batched), single)
