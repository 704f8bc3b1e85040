"""Every config field with its default. Files under configs/ start from
`base_config()` and override; `--config.a.b=value` overrides either. Nothing the
trainer reads has a default anywhere else."""
import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from dynmoe_jax import routers
from dynmoe_jax.budget_settings import BalanceSettings, BudgetSettings
from dynmoe_jax.capacity import Capacity

# The layout of the config: 1 (flat model.moe, until 2026-12) had every router's field and
# the budget's in model.moe; 2 nests them (train.compat migrates saved runs).
CONFIG_VERSION = 2


def optional(field_type, default):
  """A field with a default that a config or the command line may also set to None."""
  return FieldReference(default, field_type=field_type)


def section(settings_class, exclude=()) -> ml_collections.ConfigDict:
  """A config section holding a settings class's fields at their defaults (an Optional
  field is typed, so the command line can set it)."""
  hints = typing.get_type_hints(settings_class)
  out = ml_collections.ConfigDict()
  for field in dataclasses.fields(settings_class):
    if field.name in exclude:
      continue
    kinds = [t for t in typing.get_args(hints[field.name]) if t is not type(None)]
    if type(None) in typing.get_args(hints[field.name]):
      out[field.name] = (placeholder(kinds[0]) if field.default is None
                         else optional(kinds[0], field.default))
    else:
      out[field.name] = field.default
  return out


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.config_version = CONFIG_VERSION
  c.seed = 0
  c.num_train_steps = 3000
  c.batch_size = 128
  c.eval_batch_size = 500
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.skip_nonfinite_updates = False     # True: skip a step whose loss/grads are not finite
  c.dropped_fraction_warning = 0.2     # warn when capacity drops exceed this fraction
  c.progress_bar = True
  # Start from a dense run's workdir (sparse upcycling, dynmoe_jax.upcycle): its newest
  # checkpoint's params, with every expert of an MoE block a copy of that block's FFN.
  c.init_from = placeholder(str)
  c.upcycle = _upcycle()
  c.data = _data()
  c.model = _model()
  c.model.moe = _moe()
  # A compute budget: experts per token held at a target (budget_settings.BudgetSettings).
  c.budget = section(BudgetSettings)
  # Loss-free load balancing: a per-expert selection bias (budget_settings.BalanceSettings).
  c.balance = section(BalanceSettings)
  c.optimizer, c.mesh = _optimizer(), _mesh()
  c.adaptive = _adaptive()
  return c


def _upcycle() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.noise = 0.0                # std of noise on expert weights, x the dense std
  c.partition = False          # split the dense hidden units across experts
  c.kmeans_batches = 4         # training batches whose FFN inputs set top-any gates
  c.kmeans_iterations = 20
  return c


def _data() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.name = 'mnist1d'              # any tfds name prepared as array_record
  c.data_dir = placeholder(str)   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.kind = 'signal'               # signal | image | text | lm
  c.input_key = 'signal'
  c.label_key = 'label'
  c.train_split = 'train'
  c.eval_split = 'test'
  c.seq_len = 40                  # text / lm sequence length
  c.augment_shift = 0             # signals: random shift by up to this many samples
  return c


def _model() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.arch = 'transformer'         # transformer (pre-LN, any task) | decoder (LM only)
  c.task = 'classify'            # classify | lm
  c.stem = 'conv1d'              # conv1d | patch | embed
  c.stem_kernel = 5
  c.stem_stride = 1              # conv1d: token stride; patch: patch size
  c.num_layers = 4
  c.dim = 64
  c.num_heads = 4
  c.mlp_dim = 128                # dense FFN hidden width
  c.ffn_bias = True              # dense FFN biases (experts have none; see upcycle)
  c.dropout = 0.0
  c.pool = 'mean'                # mean | cls
  c.num_classes = 10
  c.vocab_size = 257             # bytes + padding id 0
  c.max_len = 64
  c.dtype = 'float32'
  c.param_dtype = 'float32'
  # model.arch='decoder' (models/decoder.py): RMSNorm, rotary embeddings, SwiGLU FFNs
  # (set model.moe.glu=True, model.moe.activation='silu' for SwiGLU experts), fused causal
  # attention, an optional always-on shared expert, tied embeddings, a remat policy.
  c.rope_base = 10000.0
  c.tie_embeddings = True
  c.shared_expert = False
  c.remat = 'none'               # none | full | dots
  c.attention_impl = placeholder(str)  # xla | cudnn | None: JAX picks
  # Expert choice picks each expert's tokens over a whole routing group, later tokens
  # included: an LM must opt in to that leak of the future.
  c.noncausal_routing = False
  c.moe_layers = 'every_other'   # all | every_other | none
  c.moe_layer_indices = ()       # explicit block indices; overrides moe_layers
  return c


def _moe() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.num_experts = 8
  c.num_experts_per_layer = ()  # one count per MoE block; overrides num_experts
  c.hidden_dim = 64
  c.router = 'top_any'       # a name in routers.NAMES (dynmoe_jax/routers/)
  c.dispatch_impl = 'sort'   # sort | einsum | ragged | shard_map_a2a | all_experts_reference
  # ragged's grouped matmul: auto (megablox on TPU, Pallas Triton on GPU, XLA elsewhere) |
  # xla | megablox | pallas_triton | tokamax
  c.ragged_backend = 'auto'
  c.activation = 'gelu'
  c.glu = False
  # Slots per expert and routing groups: the fields of capacity.Capacity (a re-planned
  # capacity comes from the layout, not the config).
  c.capacity = section(Capacity, exclude=('planned',))
  # Each router's settings under its name, the fields of its settings class
  # (dynmoe_jax/routers/<name>.py); the layer uses the section `router` names.
  for name, spec in routers.REGISTRY.items():
    c[name] = section(spec.settings)
  return c


def _optimizer() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.learning_rate = 1e-3
  c.warmup_steps = 100
  c.min_lr_ratio = 0.0
  c.weight_decay = 1e-4
  c.b1 = 0.9
  c.b2 = 0.98
  c.eps = 1e-8
  c.grad_clip_norm = 1.0
  return c


def _mesh() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.data = -1                     # -1: the devices left over
  c.expert = 1
  c.model = 1
  return c


def _adaptive() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.enabled = False           # add and remove experts at boundaries
  # Re-plan each MoE layer's capacity (slots per expert) at boundaries from the routing
  # recorded before them, with or without adaptive experts: the `capacity_quantile` over
  # the window's steps of the busiest expert's load, times `capacity_headroom`, raised
  # until at most `capacity_max_dropped` of the window's pairs would have been dropped; a
  # smaller plan is taken only when it saves more than `capacity_tolerance` (a recompile).
  c.capacity = False
  c.capacity_quantile = 0.9
  c.capacity_headroom = 1.1
  c.capacity_max_dropped = 0.01
  c.capacity_tolerance = 0.1
  c.every = 500               # steps between boundaries
  c.record_steps = 100        # routing window recorded before each boundary
  # The window ends this many steps before its boundary; the new layout's steps compile on
  # a thread meanwhile, so training does not stop for the compiler. 0: compile at the
  # boundary (training waits). Set it near compile seconds / step seconds.
  c.compile_lead_steps = 100
  c.min_experts = 1
  c.max_experts = 16
  c.new_expert_init = 'fresh'  # fresh | copy_nearest
  return c



def _job(router: str) -> ml_collections.ConfigDict:
  """What the MNIST-1D and byte-LM jobs share: 2,000 steps, evaluated and saved every 500;
  dense blocks of hidden 128, MoE blocks of 8 experts of hidden 64."""
  c = base_config()
  c.num_train_steps = 2000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.model.mlp_dim = 128
  c.model.moe.router = router
  c.model.moe.num_experts = 8
  c.model.moe.hidden_dim = 64
  return c


def mnist1d_config(router: str = 'top_any') -> ml_collections.ConfigDict:
  """The MNIST-1D job of configs/mnist1d_*.py: 4 pre-LN blocks of width 64 over a
  stride-2 conv stem (20 tokens per signal); blocks 1 and 3 are MoE with 8
  experts of hidden 64 (dense blocks: hidden 128, the width top-2 activates);
  random shifts of up to 5 samples augment the training signals."""
  c = _job(router)
  c.data.augment_shift = 5
  c.model.stem_stride = 2
  return c


def lm_config(router: str = 'top_any') -> ml_collections.ConfigDict:
  """Byte-level causal LM on the local Python standard library sources."""
  c = _job(router)
  c.batch_size = 32
  c.eval_batch_size = 64
  c.data.name = 'bytes_corpus'
  c.data.kind = 'lm'
  c.data.input_key = 'bytes'
  c.data.label_key = ''
  c.data.eval_split = 'test[:1024]'  # the test split: ~1,500 chunks (Python 3.11)
  c.data.seq_len = 128
  c.model.task = 'lm'
  c.model.stem = 'embed'
  c.model.max_len = 128
  return c


def decoder_lm_config(router: str) -> ml_collections.ConfigDict:
  """A decoder LM (models/decoder.py: RMSNorm, rotary embeddings, SwiGLU dense FFNs and
  experts, fused causal attention) on `python_corpus`; configs/lm_*.py set its sizes."""
  c = lm_config(router)
  c.data.name = 'python_corpus'
  c.data.eval_split = 'test[:2048]'
  c.model.arch = 'decoder'
  c.model.max_len = 1024
  c.model.moe.glu = True
  c.model.moe.activation = 'silu'
  c.optimizer.min_lr_ratio = 0.1
  return c

