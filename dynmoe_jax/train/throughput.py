"""Tokens per second and model FLOPs utilisation (MFU) of LM training.

Model FLOPs per token count what the model needs, not what the hardware ran:
per block the attention projections (8·D²), the attention scores and values
(4·S·D: PaLM's convention, arXiv 2204.02311, which does not halve for the causal
mask), the dense FFN (2·D·F per matmul) and, for MoE blocks, the expert FLOPs of the
pairs the router actually activated (measured every step) plus a shared expert; and
the output head (2·D·V). A training step is 3× the forward pass. MFU divides the
FLOPs per second by the devices' peak: bf16 dense-matmul peaks of known accelerators,
and on CPU a float32 matmul rate measured at start.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from dynmoe_jax import names

# Dense bf16 matmul peak per device (FLOP/s), by a substring of `device.device_kind`.
PEAK_BF16_FLOPS = (
    ('H200', 989e12), ('H100', 989e12), ('B200', 2250e12), ('A100', 312e12),
    ('L4', 121e12), ('A10G', 125e12),
    ('TPU v6', 918e12), ('TPU v5p', 459e12), ('TPU v5', 197e12), ('TPU v4', 275e12),
)


def device_peak_flops(devices: Sequence[Any]) -> Tuple[float, str]:
  """(peak FLOP/s of `devices` together, where the figure comes from)."""
  kind = devices[0].device_kind
  for name, peak in PEAK_BF16_FLOPS:
    if name.lower() in kind.lower():
      return peak * len(devices), f'{len(devices)} x {name} bf16 peak'
  if devices[0].platform == 'cpu':
    return measured_matmul_flops(), 'float32 matmul rate measured on this CPU'
  return float('nan'), f'unknown peak for {kind!r}: no MFU'


def measured_matmul_flops(size: int = 1024, reps: int = 5) -> float:
  """FLOP/s of a jitted size x size float32 matmul (median of `reps`)."""
  a = jnp.ones((size, size), jnp.float32)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    times.append(time.perf_counter() - start)
  return 2.0 * size ** 3 / float(np.median(times))


@dataclasses.dataclass(frozen=True)
class LMThroughput:
  """Per-token model FLOPs of an LM apart from its routed experts, and the step's tokens."""
  tokens_per_step: int
  forward_flops_per_token: float  # everything but the routed experts
  peak_flops: float
  peak_source: str

  def row_fields(self, row: Mapping[str, Any]) -> dict:
    """tokens_per_sec and mfu of a train row (its steps_per_sec and the activated expert
    FLOPs per token it reports per MoE layer)."""
    experts = sum(v for k, v in row.items()
                  if (names.split_metric_key(k) or ('', ''))[1] == 'activated_flops_per_token')
    tokens_per_sec = row['steps_per_sec'] * self.tokens_per_step
    train_flops = 3.0 * (self.forward_flops_per_token + experts) * tokens_per_sec
    return {'tokens_per_sec': tokens_per_sec, 'mfu': train_flops / self.peak_flops}


def lm_throughput(config, layout_experts: Sequence[int], peak: Tuple[float, str]
                  ) -> Optional[LMThroughput]:
  """None for classifiers (their tokens per example depend on the stem). peak: from
  `device_peak_flops`."""
  m = config.model
  if m.task != 'lm':
    return None
  seq = config.data.seq_len  # the LM reads seq_len bytes and predicts the next of each
  d = m.dim
  ffn_matmuls = 3 if m.arch == 'decoder' else 2
  flops = 0.0
  for num_experts in layout_experts:
    flops += 8 * d * d + 4 * seq * d
    if not num_experts:
      flops += 2 * d * m.mlp_dim * ffn_matmuls
    elif m.arch == 'decoder' and m.shared_expert:
      flops += 2 * d * m.moe.hidden_dim * 3
  flops += 2 * d * m.vocab_size
  return LMThroughput(config.batch_size * seq, flops, *peak)
