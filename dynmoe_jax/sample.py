"""Generate bytes from a decoder LM run's latest checkpoint, with a KV cache, and show
how many experts each prompt and generated token used.

  python -m dynmoe_jax.sample --workdir=workdir/lm_small --prompt='def main(' --max_new=200

Prints the text coloured by experts per token (mean over MoE layers; colours on a terminal
only, with their key) and, with `--html=PATH`, writes a page with the same colouring and each
token's per-layer counts. The run in `--workdir` is only read.
"""
from __future__ import annotations

import argparse
import html
import sys
from typing import List, Tuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging as absl_logging

from dynmoe_jax import names
from dynmoe_jax.train import compat

PAD = 0  # byte b is token b + 1


def encode(text: str) -> np.ndarray:
  return np.frombuffer(text.encode('utf-8'), np.uint8).astype(np.int32) + 1


def decode_bytes(tokens) -> bytes:
  return bytes(int(t) - 1 for t in tokens if t != PAD)


def generate(model, params, prompt: np.ndarray, max_new: int, *, temperature: float = 1.0,
             seed: int = 0, moe_controls=None) -> Tuple[np.ndarray, np.ndarray]:
  """(tokens [P + N], experts per token [P + N, MoE layers]) for one prompt.

  model: a `decoder.DecoderLM` with decode=True and max_len >= P + N. The prompt is
  read in one call (its keys and values cached), then one token per call; a token's
  expert counts are those of the call that read it (the last generated token is never
  read, so its counts are those of nothing: -1). moe_controls: a compute budget's
  controls as the run trained with them (`restore`), e.g. top-p's adapted p."""
  prompt = np.asarray(prompt, np.int32)
  total = len(prompt) + max_new
  if total > model.max_len:
    raise ValueError(f'prompt ({len(prompt)} bytes) + max_new ({max_new}) exceeds the '
                     f'model\'s max_len={model.max_len}')
  cache = model.init(jax.random.PRNGKey(0), jnp.ones((1, 1), jnp.int32))['cache']
  layers = names.moe_layer_names(model.experts_per_layer)

  @jax.jit
  def step(cache, tokens):
    (logits, _), state = model.apply({'params': params, 'cache': cache}, tokens,
                                     moe_controls=moe_controls,
                                     mutable=['cache', 'intermediates'])
    counts = [state['intermediates'][l]['moe']['active_experts_per_token'] for l in layers]
    counts = jnp.stack(counts, -1) if counts else jnp.zeros(tokens.shape + (0,), jnp.int32)
    return state['cache'], logits[:, -1], counts[0]

  def pick(logits, key):
    logits = logits.at[PAD].set(-jnp.inf)
    if temperature <= 0:
      return int(jnp.argmax(logits))
    return int(jax.random.categorical(key, logits / temperature))

  key = jax.random.PRNGKey(seed)
  cache, logits, counts = step(cache, jnp.asarray(prompt)[None])
  tokens, experts = list(prompt), [np.asarray(c) for c in np.asarray(counts)]
  for _ in range(max_new):
    key, sub = jax.random.split(key)
    token = pick(logits[0], sub)
    tokens.append(token)
    if len(tokens) == total:
      experts.append(np.full(len(layers), -1))
      break
    cache, logits, counts = step(cache, jnp.asarray([[token]], jnp.int32))
    experts.append(np.asarray(counts[0]))
  return np.asarray(tokens), np.stack(experts)


def restore(workdir: str):
  """(decode-mode model, params, budget controls or None) of the newest checkpoint in
  `workdir`."""
  saved = compat.saved_config(workdir)
  if saved is None:
    raise FileNotFoundError(f'{workdir} holds no run (no checkpoint, no config.json)')
  config = ml_collections.ConfigDict(saved)
  if config.model.arch != 'decoder':
    raise ValueError(f"sampling needs a model.arch='decoder' run; {workdir} holds "
                     f'{config.model.arch!r}')
  config.model.remat = 'none'
  sample = np.ones((1, config.data.seq_len), np.int32)
  model, params, _, controls = compat.restore_params(workdir, config, sample)
  return model.clone(decode=True), params, controls


BOLD, RESET = '\033[1m', '\033[0m'
COLOURS = ('\033[38;5;33m', '\033[38;5;37m', '\033[38;5;142m', '\033[38;5;208m',
           '\033[38;5;196m')
HTML_COLOURS = ('#1f77b4', '#17becf', '#bcbd22', '#ff7f0e', '#d62728')


def _bucket(mean_experts: float, top: float) -> int:
  if mean_experts < 0:
    return 0
  return int(min(len(COLOURS) - 1, round(mean_experts / max(top, 1e-9) * (len(COLOURS) - 1))))


def render(tokens: np.ndarray, experts: np.ndarray, prompt_len: int,
           colour: bool = True) -> Tuple[str, str, str]:
  """(the text, ANSI-coloured when `colour`; its colour key; an HTML page): each byte
  coloured by its experts per token."""
  means = experts.mean(-1) if experts.shape[-1] else np.zeros(len(tokens))
  top = float(max(means.max(), 1.0))
  levels = [top * i / (len(COLOURS) - 1) for i in range(len(COLOURS))]
  text: List[str] = []
  spans: List[str] = []
  for i, (token, mean) in enumerate(zip(tokens, means)):
    char = decode_bytes([token]).decode('utf-8', 'replace')
    b = _bucket(float(mean), top)
    text.append(COLOURS[b] + (BOLD if i < prompt_len else '') + char + RESET if colour else char)
    title = f'byte {i}: experts per MoE layer {experts[i].tolist()}'
    weight = 'bold' if i < prompt_len else 'normal'
    spans.append(f'<span style="color:{HTML_COLOURS[b]};font-weight:{weight}" '
                 f'title="{html.escape(title)}">{html.escape(char)}</span>')
  key = ('colour key, experts per token (mean over MoE layers): ' +
         ' '.join(f'{c}{v:.1f}{RESET}' for c, v in zip(COLOURS, levels)) + '; bold: the prompt'
         if colour else '')
  legend = ' '.join(f'<span style="color:{c}">■ {v:.1f}</span>'
                    for c, v in zip(HTML_COLOURS, levels))
  page = ('<!doctype html><meta charset="utf-8"><title>dynmoe_jax sample</title>'
          '<p>Experts per token (mean over MoE layers): ' + legend +
          '. Bold: the prompt. Hover a byte for its per-layer counts.</p>'
          '<pre style="font-size:14px">' + ''.join(spans) + '</pre>')
  return ''.join(text), key, page


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--prompt', default='def ')
  parser.add_argument('--max_new', type=int, default=200)
  parser.add_argument('--temperature', type=float, default=0.8)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--html', default=None,
                      help='also write the coloured sample, with per-layer counts, to this file')
  parser.add_argument('--colour', choices=('auto', 'always', 'never'), default='auto',
                      help='ANSI colours: auto = only when stdout is a terminal')
  args = parser.parse_args(argv)
  absl_logging.set_verbosity(absl_logging.ERROR)  # orbax's notes on read-only checkpoints
  try:
    model, params, controls = restore(args.workdir)
    prompt = encode(args.prompt)
    tokens, experts = generate(model, params, prompt, args.max_new,
                               temperature=args.temperature, seed=args.seed,
                               moe_controls=controls)
  except (FileNotFoundError, ValueError) as e:
    print(f'error: {e}', file=sys.stderr)
    return 2
  colour = args.colour == 'always' or (args.colour == 'auto' and sys.stdout.isatty())
  text, key, page = render(tokens, experts, len(prompt), colour)
  print(text)
  if key:
    print(key)
  means = experts[experts[:, 0] >= 0].mean(0) if experts.shape[-1] else []
  print(f'\nexperts per token by MoE layer (mean): {np.round(means, 2).tolist()}')
  if args.html:
    try:
      with open(args.html, 'w') as f:
        f.write(page)
    except OSError as e:
      print(f'error: cannot write --html={args.html}: {e.strerror}', file=sys.stderr)
      return 2
    print(f'wrote {args.html}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
