"""Every config field with its default. Files under configs/ start from
`base_config()` and override; `--config.a.b=value` overrides either. Nothing the
trainer reads has a default anywhere else."""
import dataclasses
import typing

import ml_collections
from ml_collections.config_dict import FieldReference, placeholder

from dynmoe_jax import routers
from dynmoe_jax.budget_settings import BudgetSettings
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

  c.upcycle = ml_collections.ConfigDict()
  c.upcycle.noise = 0.0                # std of noise on expert weights, x the dense std
  c.upcycle.partition = False          # split the dense hidden units across experts
  c.upcycle.kmeans_batches = 4         # training batches whose FFN inputs set top-any gates
  c.upcycle.kmeans_iterations = 20

  c.data = ml_collections.ConfigDict()
  c.data.name = 'mnist1d'              # any tfds name prepared as array_record
  c.data.data_dir = placeholder(str)   # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.data.kind = 'signal'               # signal | image | text | lm
  c.data.input_key = 'signal'
  c.data.label_key = 'label'
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.seq_len = 40                  # text / lm sequence length
  c.data.augment_shift = 0             # signals: random shift by up to this many samples

  c.model = ml_collections.ConfigDict()
  c.model.arch = 'transformer'         # transformer (pre-LN, any task) | decoder (LM only)
  c.model.task = 'classify'            # classify | lm
  c.model.stem = 'conv1d'              # conv1d | patch | embed
  c.model.stem_kernel = 5
  c.model.stem_stride = 1              # conv1d: token stride; patch: patch size
  c.model.num_layers = 4
  c.model.dim = 64
  c.model.num_heads = 4
  c.model.mlp_dim = 128                # dense FFN hidden width
  c.model.ffn_bias = True              # dense FFN biases (experts have none; see upcycle)
  c.model.dropout = 0.0
  c.model.pool = 'mean'                # mean | cls
  c.model.num_classes = 10
  c.model.vocab_size = 257             # bytes + padding id 0
  c.model.max_len = 64
  c.model.dtype = 'float32'
  c.model.param_dtype = 'float32'
  # model.arch='decoder' (models/decoder.py): RMSNorm, rotary embeddings, SwiGLU FFNs
  # (set model.moe.glu=True, model.moe.activation='silu' for SwiGLU experts), fused causal
  # attention, an optional always-on shared expert, tied embeddings, a remat policy.
  c.model.rope_base = 10000.0
  c.model.tie_embeddings = True
  c.model.shared_expert = False
  c.model.remat = 'none'               # none | full | dots
  c.model.attention_impl = placeholder(str)  # xla | cudnn | None: JAX picks
  # Expert choice picks each expert's tokens over a whole routing group, later tokens
  # included: an LM must opt in to that leak of the future.
  c.model.noncausal_routing = False
  c.model.moe_layers = 'every_other'   # all | every_other | none
  c.model.moe_layer_indices = ()       # explicit block indices; overrides moe_layers

  c.model.moe = ml_collections.ConfigDict()
  c.model.moe.num_experts = 8
  c.model.moe.num_experts_per_layer = ()  # one count per MoE block; overrides num_experts
  c.model.moe.hidden_dim = 64
  c.model.moe.router = 'top_any'       # top_any | top_k | top_p | adaptive_k | expert_choice
  c.model.moe.dispatch_impl = 'sort'   # sort | einsum | ragged | shard_map_a2a | all_experts_reference
  # ragged's grouped matmul: auto (megablox on TPU, Pallas Triton on GPU, XLA elsewhere) |
  # xla | megablox | pallas_triton | tokamax
  c.model.moe.ragged_backend = 'auto'
  c.model.moe.activation = 'gelu'
  c.model.moe.glu = False
  # Slots per expert and routing groups: the fields of capacity.Capacity (a re-planned
  # capacity comes from the layout, not the config).
  c.model.moe.capacity = section(Capacity, exclude=('planned',))
  # Each router's settings under its name, the fields of its settings class
  # (dynmoe_jax/routers/<name>.py); the layer uses the section `router` names.
  for name, spec in routers.REGISTRY.items():
    c.model.moe[name] = section(spec.settings)

  # A compute budget: experts per token held at a target (budget_settings.BudgetSettings).
  c.budget = section(BudgetSettings)

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 100
  c.optimizer.min_lr_ratio = 0.0
  c.optimizer.weight_decay = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-8
  c.optimizer.grad_clip_norm = 1.0

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1                     # -1: the devices left over
  c.mesh.expert = 1
  c.mesh.model = 1

  c.adaptive = ml_collections.ConfigDict()
  c.adaptive.enabled = False           # add and remove experts at boundaries
  # Re-plan each MoE layer's capacity (slots per expert) at boundaries from the routing
  # recorded before them, with or without adaptive experts: the `capacity_quantile` over
  # the window's steps of the busiest expert's load, times `capacity_headroom`, raised
  # until at most `capacity_max_dropped` of the window's pairs would have been dropped; a
  # smaller plan is taken only when it saves more than `capacity_tolerance` (a recompile).
  c.adaptive.capacity = False
  c.adaptive.capacity_quantile = 0.9
  c.adaptive.capacity_headroom = 1.1
  c.adaptive.capacity_max_dropped = 0.01
  c.adaptive.capacity_tolerance = 0.1
  c.adaptive.every = 500               # steps between boundaries
  c.adaptive.record_steps = 100        # routing window recorded before each boundary
  # The window ends this many steps before its boundary; the new layout's steps compile on
  # a thread meanwhile, so training does not stop for the compiler. 0: compile at the
  # boundary (training waits). Set it near compile seconds / step seconds.
  c.adaptive.compile_lead_steps = 100
  c.adaptive.min_experts = 1
  c.adaptive.max_experts = 16
  c.adaptive.new_expert_init = 'fresh'  # fresh | copy_nearest
  return c


def mnist1d_config(router: str = 'top_any') -> ml_collections.ConfigDict:
  """The MNIST-1D job of configs/mnist1d_*.py: 4 pre-LN blocks of width 64 over a
  stride-2 conv stem (20 tokens per signal); blocks 1 and 3 are MoE with 8
  experts of hidden 64 (dense blocks: hidden 128, the width top-2 activates);
  random shifts of up to 5 samples augment the training signals."""
  c = base_config()
  c.num_train_steps = 2000
  c.eval_every = 500
  c.checkpoint_every = 500
  c.data.augment_shift = 5
  c.model.stem_stride = 2
  c.model.mlp_dim = 128
  c.model.moe.router = router
  c.model.moe.num_experts = 8
  c.model.moe.hidden_dim = 64
  return c


def lm_config(router: str = 'top_any') -> ml_collections.ConfigDict:
  """Byte-level causal LM on the local Python standard library sources."""
  c = base_config()
  c.num_train_steps = 2000
  c.batch_size = 32
  c.eval_batch_size = 64
  c.eval_every = 500
  c.checkpoint_every = 500
  c.data.name = 'bytes_corpus'
  c.data.kind = 'lm'
  c.data.input_key = 'bytes'
  c.data.label_key = ''
  c.data.eval_split = 'test[:1024]'  # the test split: ~1,500 chunks (Python 3.11)
  c.data.seq_len = 128
  c.model.task = 'lm'
  c.model.stem = 'embed'
  c.model.max_len = 128
  c.model.mlp_dim = 128
  c.model.moe.router = router
  c.model.moe.num_experts = 8
  c.model.moe.hidden_dim = 64
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

