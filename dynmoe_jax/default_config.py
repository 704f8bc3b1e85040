"""Every config field with its default. Files under configs/ start from
`base_config()` and override; `--config.a.b=value` overrides either. Nothing the
trainer reads has a default anywhere else."""
import ml_collections
from ml_collections.config_dict import FieldReference, placeholder


def optional(field_type, default):
  """A field with a default that a config or the command line may also set to None."""
  return FieldReference(default, field_type=field_type)


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
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
  c.model.moe.k = 2
  c.model.moe.p = 0.4
  c.model.moe.max_k = placeholder(int)
  c.model.moe.expected_k = placeholder(float)
  c.model.moe.capacity_factor = 2.0
  c.model.moe.eval_capacity_factor = 4.0
  c.model.moe.capacity_multiple_of = 8
  c.model.moe.capacity = placeholder(int)  # slots per expert, as given: overrides the factors
  c.model.moe.group_size = placeholder(int)  # tokens per routing group; None: one per call
  c.model.moe.dispatch_impl = 'sort'   # sort | einsum | ragged | shard_map_a2a | all_experts_reference
  # ragged's grouped matmul: auto (megablox on TPU, Pallas Triton on GPU, XLA elsewhere) |
  # xla | megablox | pallas_triton | tokamax
  c.model.moe.ragged_backend = 'auto'
  c.model.moe.priority = placeholder(str)  # None: the router's (top_k: gshard, others: score)
  c.model.moe.activation = 'gelu'
  c.model.moe.glu = False
  c.model.moe.normalize_top_k = placeholder(bool)  # None: for k >= 2 only (k = 1: Switch's raw p)
  c.model.moe.top_any_scale = 1.0         # temperature (its initial value when learned)
  c.model.moe.top_any_learned_scale = False  # True: learned in log space (reference: init 10)
  c.model.moe.top_any_max_scale = 100.0      # cap of a learned temperature
  # True: in training too, a token whose scores all fall below the thresholds takes its
  # top-1 expert (as in evaluation), so a layer cannot die; see routing.top_any.
  c.model.moe.top_any_train_fallback = False
  c.model.moe.top_any_differentiable_normalization = False  # True: the reference's Tutel variant
  c.model.moe.diversity_weight = 0.01
  c.model.moe.simplicity_weight = 0.01
  c.model.moe.load_balance_weight = 0.01  # top-any too: over tokens with an expert
  c.model.moe.efficiency_weight = 0.01    # top-any: mean K / E (the reference's 2025 term)
  c.model.moe.gshard_balance_weight = 0.0  # top-any: GShard's loss on the binary scores
  # Compute budget: experts per token to hold (None = off). Capacity is sized for it and
  # the efficiency weight becomes a per-layer controller (train.budget).
  c.model.moe.target_experts_per_token = placeholder(float)
  c.model.moe.budget_rate = 1.05
  c.model.moe.budget_two_sided = False  # True: below the target the weight turns negative
  # u: each update is budget_rate to the power of the relative error |K - target| / target
  # over u (at most 5); 0 or None: one budget_rate step whatever the error (ReMoE's rule)
  c.model.moe.budget_error_unit = optional(float, 0.1)
  # H: act on the count H steps ahead at its smoothed trend (a proportional term that stops
  # the price winding up while the count already falls); 0 or None: on this step's count.
  # Both 0: the first controller, as the earlier budget figures of docs/results.md were measured.
  c.model.moe.budget_horizon = optional(float, 20.0)
  c.model.moe.z_loss_weight = 1e-3
  c.model.moe.entropy_weight = 1e-4

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

