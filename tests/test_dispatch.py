"""Dispatch + combine against a per-expert Python-loop oracle."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from dynmoe_jax import capacity, dispatch

T, E, D = 48, 6, 5


def oracle(tokens, mask, weights, capacity, priority, expert_kernels):
  """Each expert serves its routed tokens in priority order until full."""
  out = np.zeros_like(tokens)
  dropped = np.zeros(mask.shape, bool)
  slots = np.full((E, capacity), -1)
  for e in range(E):
    routed = [t for t in range(T) if mask[t, e]]
    if priority is not None:
      routed.sort(key=lambda t: (-priority[t, e], t))
    for c, t in enumerate(routed):
      if c >= capacity:
        dropped[t, e] = True
        continue
      slots[e, c] = t
      out[t] += weights[t, e] * (tokens[t] @ expert_kernels[e])
  return out, dropped, slots


def make_case(seed, density=0.4):
  rng = np.random.RandomState(seed)
  tokens = rng.randn(T, D).astype(np.float32)
  mask = rng.rand(T, E) < density
  weights = np.where(mask, rng.rand(T, E), 0.0).astype(np.float32)
  priority = rng.rand(T, E).astype(np.float32)
  kernels = rng.randn(E, D, D).astype(np.float32)
  return tokens, mask, weights, priority, kernels


def run_capacity_path(impl, tokens, mask, weights, capacity, priority, kernels):
  expert_in, state = dispatch.dispatch(tokens, mask, capacity, priority=priority, impl=impl)
  chex.assert_shape(expert_in, (E, capacity, D))
  expert_out = jnp.einsum('ecd,edf->ecf', expert_in, kernels)
  return expert_in, dispatch.combine(expert_out, weights, state), state


class DispatchTest(parameterized.TestCase):

  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.product(impl=['sort', 'einsum'], capacity=[1, 5, 8, 48],
                         use_priority=[False, True], seed=[0, 1])
  def test_matches_oracle(self, impl, capacity, use_priority, seed):
    tokens, mask, weights, priority, kernels = make_case(seed)
    priority = priority if use_priority else None
    fn = self.variant(lambda *a: run_capacity_path(impl, *a, capacity, priority, kernels),
                      static_argnums=())
    expert_in, y, state = fn(tokens, mask, weights)
    want_y, want_dropped, slots = oracle(tokens, mask, weights, capacity, priority, kernels)
    np.testing.assert_allclose(y, want_y, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(state.dropped, want_dropped)
    assert int(state.num_dropped) == want_dropped.sum()
    assert int(state.num_routed) == mask.sum()
    # slot contents: token t's row in its slot, zeros in empty slots
    want_in = np.where(slots[..., None] >= 0, tokens[np.maximum(slots, 0)], 0.0)
    np.testing.assert_allclose(expert_in, want_in, atol=1e-6)
    if capacity == 48:
      assert int(state.num_dropped) == 0

  def test_small_capacity_drops_exactly_the_overflow(self):
    mask = np.zeros((T, E), bool)
    mask[:10, 0] = True  # 10 tokens want expert 0, capacity 4
    priority = np.zeros((T, E), np.float32)
    priority[[9, 3, 7, 0], 0] = [4.0, 3.0, 2.0, 1.0]
    tokens = np.eye(T, D, dtype=np.float32)
    for impl in ('sort', 'einsum'):
      _, state = dispatch.dispatch(tokens, mask, 4, impl=impl)
      np.testing.assert_array_equal(np.where(state.dropped[:, 0])[0], np.arange(4, 10))
      _, state = dispatch.dispatch(tokens, mask, 4, priority=priority, impl=impl)
      kept = sorted(set(range(10)) - set(np.where(state.dropped[:, 0])[0]))
      assert kept == [0, 3, 7, 9], impl

  def test_max_k_overflow_is_counted_not_silent(self):
    tokens, mask, weights, _, kernels = make_case(0, density=0.9)
    _, state = dispatch.dispatch(tokens, mask, T, max_k=2)
    over = np.maximum(mask.sum(-1) - 2, 0).sum()
    assert over > 0 and int(state.num_dropped) == over

  @parameterized.parameters(None, 3)
  def test_ragged_is_dropless(self, max_k):
    tokens, mask, weights, _, kernels = make_case(2, density=0.3)
    if max_k is not None:
      mask = mask & (np.cumsum(mask, -1) <= max_k)
    sorted_in, state = dispatch.ragged_dispatch(tokens, mask, max_k=max_k)
    sorted_out = jax.lax.ragged_dot(sorted_in, kernels, state.group_sizes)
    y = dispatch.ragged_combine(sorted_out, weights, state)
    want, _, _ = oracle(tokens, mask, weights, T, None, kernels)
    np.testing.assert_allclose(y, want, atol=1e-4, rtol=1e-4)
    assert int(state.num_dropped) == 0
    np.testing.assert_array_equal(state.group_sizes, mask.sum(0))

  def test_combine_gradients_reach_weights_and_tokens(self):
    tokens, mask, weights, priority, kernels = make_case(3)

    def loss(tok, w, impl):
      _, y, _ = run_capacity_path(impl, tok, mask, w, 8, priority, kernels)
      return jnp.sum(y ** 2)

    g_sort = jax.grad(loss, argnums=(0, 1))(tokens, weights, 'sort')
    g_einsum = jax.grad(loss, argnums=(0, 1))(tokens, weights, 'einsum')
    chex.assert_trees_all_close(g_sort, g_einsum, atol=1e-3, rtol=1e-4)
    assert float(jnp.abs(g_sort[1]).sum()) > 0

  def test_bf16_tokens(self):
    tokens, mask, weights, priority, kernels = make_case(4)
    expert_in, state = dispatch.dispatch(jnp.asarray(tokens, jnp.bfloat16), mask, 8)
    assert expert_in.dtype == jnp.bfloat16
    y = dispatch.combine(expert_in, weights, state)
    assert y.dtype == jnp.bfloat16 and y.shape == (T, D)


class CapacityTest(parameterized.TestCase):

  @parameterized.parameters(
      (4096, 8, 1.25, 2, 8, 1280),   # ceil(1.25*4096*2/8) = 1280
      (100, 8, 1.0, 1, 8, 16),       # 12.5 -> 13 -> 16
      (10, 2, 4.0, 2, 8, 16),        # capped at T rounded up (10 -> 16)
      (64, 64, 0.1, 1, 1, 1))        # at least one slot
  def test_values(self, t, e, cf, k, mult, want):
    assert capacity.factor_rule(t, e, cf, k, mult) == want

  @parameterized.parameters(0.0, -1.0)
  def test_bad_factor(self, cf):
    with pytest.raises(ValueError, match='capacity factor must be > 0'):
      capacity.factor_rule(16, 4, cf, 1)

  def test_bad_dispatch_args(self):
    with pytest.raises(ValueError, match='impl'):
      dispatch.dispatch(jnp.ones((4, 2)), jnp.ones((4, 3), bool), 4, impl='onehot')
    with pytest.raises(ValueError, match='capacity'):
      dispatch.dispatch(jnp.ones((4, 2)), jnp.ones((4, 3), bool), 0)
    with pytest.raises(ValueError, match='tokens'):
      dispatch.dispatch(jnp.ones((5, 2)), jnp.ones((4, 3), bool), 4)


@pytest.mark.parametrize('density', [0.0, 0.2, 0.6, 1.0])
def test_routed_pairs_keep_the_lowest_expert_ids_up_to_max_k(density):
  rng = np.random.RandomState(int(density * 10))
  mask = rng.rand(T, E) < density
  for max_k in range(1, E + 1):
    ids, k = dispatch._routed_pairs(jnp.asarray(mask), max_k)
    expected = np.full((T, max_k), E)
    for t in range(T):
      routed = np.where(mask[t])[0][:max_k]
      expected[t, :len(routed)] = routed
    assert k == max_k
    # max_k = E keeps every routed id in its own column; order does not matter downstream
    np.testing.assert_array_equal(np.sort(ids, axis=1), expected, err_msg=f"max_k={max_k}")


def vmoe_top_k_assignment(gates, k, capacity, batch_priority):
  """V-MoE's / flaxformer's token-choice dispatch, from their published semantics: choice
  by choice (every token's first choice, then every token's second, ...), tokens in
  index order or, with batch priority, by their top-1 gate (highest first, ties by
  index); a pair is kept while its expert has a free slot. -> {(token, expert): slot}."""
  num_tokens, num_experts = gates.shape
  choices = np.argsort(-gates, axis=1, kind='stable')[:, :k]
  order = (np.argsort(-gates.max(1), kind='stable') if batch_priority
           else np.arange(num_tokens))
  filled = np.zeros(num_experts, int)
  slots = {}
  for i in range(k):
    for t in order:
      e = choices[t, i]
      if filled[e] < capacity:
        slots[(t, e)] = filled[e]
        filled[e] += 1
  return slots


@pytest.mark.parametrize('impl', ['sort', 'einsum'])
@pytest.mark.parametrize('k', [1, 2])
@pytest.mark.parametrize('order', ['gshard', 'batch'])
def test_gshard_and_batch_orders_dispatch_and_combine_as_vmoe(order, k, impl):
  from dynmoe_jax import routing
  rng = np.random.RandomState(k)
  tokens = rng.randn(T, D).astype(np.float32)
  logits = (2.0 * rng.randn(T, E)).astype(np.float32)
  kernels = rng.randn(E, D, D).astype(np.float32)
  capacity = 5  # T * k / E = 8 or 16 pairs per expert on average: overflow everywhere
  route = routing.top_k(jnp.asarray(logits), k, normalize=False)  # V-MoE: raw gates
  gates = np.asarray(route.scores)
  priority = routing.choice_priority(route.scores, route.mask, order)
  expert_inputs, state = dispatch.dispatch(jnp.asarray(tokens), route.mask, capacity,
                                           priority=priority, impl=impl)
  slots = vmoe_top_k_assignment(gates, k, capacity, order == 'batch')
  expected_inputs = np.zeros((E, capacity, D), np.float32)
  expected_y = np.zeros((T, D), np.float32)
  for (t, e), c in slots.items():
    expected_inputs[e, c] = tokens[t]
    expected_y[t] += gates[t, e] * (tokens[t] @ kernels[e])
  np.testing.assert_array_equal(np.asarray(expert_inputs), expected_inputs)
  assert int(state.num_dropped) == T * k - len(slots) > 0
  expert_out = jnp.einsum('ecd,edf->ecf', expert_inputs, jnp.asarray(kernels))
  y = state.combine(expert_out, route.weights)
  np.testing.assert_allclose(np.asarray(y), expected_y, rtol=1e-5, atol=1e-5)


def test_the_score_order_lets_a_second_choice_take_a_first_choices_slot():
  # why top_k's default is 'gshard': with 'score' a confident second choice can push out
  # another token's first choice
  from dynmoe_jax import routing
  logits = jnp.log(jnp.asarray([[0.50, 0.45, 0.05],    # token 0: expert 1 its 2nd choice
                                [0.35, 0.40, 0.25]]))   # token 1: expert 1 its 1st choice
  route = routing.top_k(logits, 2, normalize=False)
  kept = {}
  for order, priority in (('score', route.scores),
                          ('gshard', routing.choice_priority(route.scores, route.mask,
                                                             'gshard'))):
    _, state = dispatch.dispatch(jnp.eye(2, 4), route.mask, 1, priority=priority)
    kept[order] = not bool(state.dropped[1, 1])
  assert kept == {'score': False, 'gshard': True}
