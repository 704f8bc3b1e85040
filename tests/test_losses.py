"""Auxiliary losses on hand-built inputs with their values written out."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dynmoe_jax import losses


def test_diversity_zero_for_orthonormal_and_known_value():
  assert float(losses.diversity(jnp.eye(4, 8) * 3.0)) == pytest.approx(0.0, abs=1e-2)
  # two identical directions: gram off-diagonals are 1 -> ||G - I||_F = sqrt(2)
  w = jnp.array([[1.0, 0.0], [2.0, 0.0]])
  assert float(losses.diversity(w)) == pytest.approx(np.sqrt(2), rel=1e-4)
  # masking the duplicate away leaves a single orthonormal row
  assert float(losses.diversity(w, jnp.array([True, False]))) == pytest.approx(0, abs=1e-2)


def test_simplicity_is_mean_row_norm():
  w = jnp.array([[3.0, 4.0], [0.0, 1.0]])
  assert float(losses.simplicity(w)) == pytest.approx(3.0)


def test_load_balance_uniform_is_one_and_collapse_is_e():
  e = 4
  probs = jnp.full((8, e), 1.0 / e)
  mask = jnp.eye(e, dtype=bool)[jnp.arange(8) % e]
  assert float(losses.load_balance(probs, mask)) == pytest.approx(1.0)
  collapsed_probs = jnp.zeros((8, e)).at[:, 0].set(1.0)
  collapsed_mask = jnp.zeros((8, e), bool).at[:, 0].set(True)
  assert float(losses.load_balance(collapsed_probs, collapsed_mask)) == pytest.approx(e)


def test_z_loss_and_entropy():
  logits = jnp.zeros((3, 4))
  assert float(losses.z_loss(logits)) == pytest.approx(np.log(4) ** 2, rel=1e-5)
  assert float(losses.router_entropy(jax.nn.softmax(logits))) == pytest.approx(np.log(4), rel=1e-4)
  assert float(losses.router_entropy(jnp.eye(4))) == pytest.approx(0.0, abs=1e-4)


def test_losses_are_differentiable_and_finite():
  w = jax.random.normal(jax.random.PRNGKey(0), (6, 16))
  grads = jax.grad(lambda w: losses.diversity(w) + losses.simplicity(w))(w)
  assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads).sum()) > 0


def reference_l_aux(tokens, gate_embeddings, thresholds):
  """numpy port of the reference's topanygating_opt l_aux (LINs-lab/DynMoE, DeepSpeed
  variant, Jan 2025) with every expert enabled and temperature 1: diversity + simplicity
  of the [D, E] similarity matrix + load balance + efficiency of the {0, 1} gates."""
  normalize = lambda x, axis: x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True),
                                             1e-12)
  sim = gate_embeddings.T  # [D, E]
  scores = 1 / (1 + np.exp(-(normalize(tokens, 1) @ normalize(sim, 0))))
  gates = np.sign(np.maximum(scores - 1 / (1 + np.exp(-thresholds)), 0))
  num_experts = gates.shape[1]
  sims = normalize(sim, 0).T @ normalize(sim, 0)
  diversity = np.linalg.norm(sims - np.eye(num_experts))
  simplicity = np.mean(np.linalg.norm(sim, axis=0))
  nonzero = gates.sum(1) > 0
  normalized = gates[nonzero] / gates[nonzero].sum(1, keepdims=True)
  me, ce = normalized.mean(0), (gates[nonzero] > 0).mean(0)
  load_balance = np.mean(me * ce) * num_experts**2
  efficiency = gates.mean()
  return diversity + simplicity + load_balance + efficiency, gates


def test_top_any_aux_loss_is_c_times_the_reference_l_aux():
  from dynmoe_jax import layers, routers
  from dynmoe_jax.capacity import Capacity
  rng = np.random.RandomState(0)
  T, D, E, c = 64, 16, 6, 0.01
  tokens = rng.randn(T, D).astype(np.float32)
  gate_embeddings = rng.randn(E, D).astype(np.float32) * rng.uniform(0.5, 2, (E, 1))
  thresholds = rng.uniform(-0.2, 0.6, E).astype(np.float32)
  want, gates = reference_l_aux(tokens.astype(np.float64), gate_embeddings.astype(np.float64),
                                thresholds.astype(np.float64))
  assert 0 < (gates.sum(1) == 0).sum() < T  # tokens with no expert are excluded from balance
  weights = routers.TopAny(diversity_weight=c, simplicity_weight=c, load_balance_weight=c,
                           efficiency_weight=c)
  moe = layers.MoE(num_experts=E, hidden_dim=8, router=weights, capacity=Capacity(factor=8.0))
  params = nn.meta.unbox(moe.init(jax.random.PRNGKey(0), tokens)['params'])
  params = {**params, 'gate_embeddings': jnp.asarray(gate_embeddings),
            'thresholds': jnp.asarray(thresholds)}
  _, aux = moe.apply({'params': params}, tokens, training=True)
  assert float(aux.loss) == pytest.approx(c * want, rel=1e-5, abs=1e-7)


def test_diversity_is_exactly_zero_at_orthonormal_embeddings_with_a_finite_gradient():
  w = jnp.asarray(np.linalg.qr(np.random.RandomState(1).randn(8, 8))[0][:4])  # orthonormal rows
  assert float(losses.diversity(w)) < 1e-6
  assert float(losses.diversity(jnp.eye(4, 8))) == 0.0
  grad = jax.grad(losses.diversity)(jnp.eye(4, 8))
  assert bool(jnp.all(jnp.isfinite(grad)))
  # at float32-orthonormal rows the residual is rounding noise: no gradient from it (an
  # exact norm's gradient there is a unit-length noise direction, which Adam amplifies)
  noisy = jnp.asarray(w, jnp.float32)
  assert float(jnp.abs(jax.grad(losses.diversity)(noisy)).max()) == 0.0
  # and above the floor it is the exact norm
  far = noisy.at[0].set(noisy[1])
  assert float(losses.diversity(far)) == pytest.approx(np.sqrt(2), rel=1e-5)


def test_cosine_scores_do_not_move_when_an_embedding_shrinks():
  from dynmoe_jax import routing
  rng = np.random.RandomState(2)
  tokens, gates = jnp.asarray(rng.randn(5, 8)), jnp.asarray(rng.randn(3, 8))
  np.testing.assert_allclose(routing.cosine_similarity(tokens, gates * 1e-4),
                             routing.cosine_similarity(tokens, gates), rtol=1e-6, atol=1e-7)


def test_efficiency_gradient_raises_thresholds():
  from dynmoe_jax import routing
  rng = np.random.RandomState(3)
  tokens, gates = jnp.asarray(rng.randn(32, 8)), jnp.asarray(rng.randn(4, 8))

  def loss(thresholds):
    out = routing.top_any(tokens, gates, thresholds, training=True)
    return losses.efficiency(out.gates)
  grad = jax.grad(loss)(jnp.zeros(4))
  assert bool(jnp.all(grad < 0))  # gradient descent raises every threshold: fewer experts
  assert float(loss(jnp.zeros(4))) == pytest.approx(
      float(routing.top_any(tokens, gates, jnp.zeros(4)).num_active.mean()) / 4)


def test_gshard_balance_on_binary_scores_by_hand():
  # 4 tokens, 2 experts. Gates (thresholds passed): t0 {0, 1}, t1 {0}, t2 {1}, t3 none;
  # first experts by score: t0 -> 1 (0.9 > 0.6), t1 -> 0, t2 -> 1; t3 counts for none.
  gates = jnp.array([[1., 1.], [1., 0.], [0., 1.], [0., 0.]])
  scores = jnp.array([[0.6, 0.9], [0.7, 0.2], [0.1, 0.8], [0.3, 0.4]])
  me, ce = np.array([2, 2]) / 4, np.array([1, 2]) / 4
  assert float(losses.top_any_gshard_balance(gates, scores)) == pytest.approx(
      2 * float(np.sum(me * ce)))
  # one expert per token, spread evenly: 1; all tokens on one expert: E
  eye = jnp.eye(4)
  assert float(losses.top_any_gshard_balance(eye, eye)) == pytest.approx(1.0)
  one = jnp.zeros((4, 4)).at[:, 2].set(1.0)
  assert float(losses.top_any_gshard_balance(one, one)) == pytest.approx(4.0)


def test_gshard_balance_gradient_lowers_the_busiest_experts_gate():
  from dynmoe_jax import routing
  rng = np.random.RandomState(4)
  tokens, embeddings = jnp.asarray(rng.randn(64, 8)), jnp.asarray(rng.randn(4, 8))
  thresholds = jnp.array([-0.5, 0.2, 0.2, 0.2])  # expert 0 takes most tokens first

  def loss(t):
    out = routing.top_any(tokens, embeddings, t, training=True)
    return losses.top_any_gshard_balance(out.gates, out.scores)
  grad = jax.grad(loss)(thresholds)
  # descent raises the busiest expert's threshold the most
  assert int(jnp.argmin(grad)) == 0 and float(grad[0]) < 0
