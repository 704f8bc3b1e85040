"""Default job (`make train`): DynMoE top-any gating on MNIST-1D, CPU-sized, with 4
experts per MoE block. See dynmoe_jax.default_config.mnist1d_config for the model and
schedule.

Why 4 experts and not the 8 of the other MNIST-1D configs: over 3 seeds
(experiments/mnist1d_experts.py) 4 experts reach 97.9% with no token dropped for
capacity; 8 experts activate 5-6 per token, overflow the capacity sized for 2
(27-35% of training pairs dropped) and reach 97.8%; the dense model with top-2's
activated width (configs/mnist1d_dense.py) reaches 98.1%.

Why the paper's (2024) top-any losses here, while the library default is the
reference's 2025 set (+ load balance + efficiency): on this job the 2025 terms halve
the experts per token (about 1.1 of 4 instead of 1.3 and 3.1) but cost accuracy
(97.53 ± 0.06 over 3 seeds, 0.57 below dense); README, "Top-any with the reference's
2025 losses". `--config.model.moe.efficiency_weight=0.01
--config.model.moe.load_balance_weight=0.01` gives the 2025 set,
`--config.model.moe.target_experts_per_token=1.5` a compute budget."""
from dynmoe_jax.default_config import mnist1d_config


def get_config():
  config = mnist1d_config('top_any')
  config.model.moe.num_experts = 4
  config.model.moe.load_balance_weight = 0.0
  config.model.moe.efficiency_weight = 0.0
  return config
