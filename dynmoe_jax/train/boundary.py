"""Layout boundaries: routing records -> plan -> compile ahead -> resize -> switch.

The layout (experts per block and, with `adaptive.capacity`, slots per expert) is
static under jit and changes only here, every `adaptive.every` steps. The routing window that a boundary plans from ends
`adaptive.compile_lead_steps` before it; from then on the new layout's steps
compile on a thread while training goes on, because the new shapes follow from
the records alone. At the boundary the parameters and optimizer state are
reallocated (adaptive.resize) and training switches to the new steps. This is
the one place where further layout decisions plug in.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import time
from typing import Any, Callable, Dict, Optional, Tuple

import jax

from dynmoe_jax import adaptive, config_lib, layers, names
from dynmoe_jax import capacity as capacity_lib
from dynmoe_jax.layout import Layout
from dynmoe_jax.train import balance
from dynmoe_jax.train.compiled import Compiled
from dynmoe_jax.train.metrics_log import MetricsLog

log = logging.getLogger('dynmoe_jax')


class LayoutBoundary:

  def __init__(self, config, compile_fn: Callable[[Layout], Compiled], metrics: MetricsLog):
    self.settings = config.adaptive
    self.router_settings = config_lib.router_settings(config)
    self.capacity = config_lib.moe_kwargs(config)['capacity']
    self.router = config.model.moe.router
    self.seed = config.seed
    self.num_train_steps = config.num_train_steps
    self.compile_fn = compile_fn
    self.metrics = metrics
    self.records: Dict[str, adaptive.RecordAccumulator] = {}
    # The next boundary's layout and a future of its compiled steps (None when the
    # layout will not change).
    self._ahead: Optional[Tuple[Layout, Optional[concurrent.futures.Future]]] = None
    self._compiler: Optional[concurrent.futures.ThreadPoolExecutor] = None

  @property
  def enabled(self) -> bool:
    """Boundaries fire when experts are added and removed or capacity is re-planned."""
    return bool(self.settings.enabled or self.settings.capacity)

  def planned(self, current: Layout) -> Layout:
    """The layout the next boundary gives, from the records alone."""
    a = self.settings
    rule = capacity_lib.PlanRule(
        a.capacity_quantile, a.capacity_headroom, a.capacity_max_dropped,
        a.capacity_tolerance, self.capacity.multiple_of) if a.capacity else None

    def current_slots(block: int, tokens: int) -> int:
      planned = dataclasses.replace(self.capacity, planned=current.capacity_plan(block))
      return capacity_lib.slots_per_expert(planned, self.router_settings, tokens,
                                           current.experts[block], training=True)

    return adaptive.planned_layout(
        current, self.records,
        expert_bounds=(a.min_experts, a.max_experts) if a.enabled else None,
        capacity_rule=rule, current_slots=current_slots)

  # -- checkpointed state -----------------------------------------------------------------

  def records_json(self) -> Dict[str, Any]:
    return {k: v.to_json() for k, v in self.records.items()}

  def load_records(self, data: Dict[str, Any]):
    self.records = {k: adaptive.RecordAccumulator.from_json(v) for k, v in data.items()}

  # -- when ------------------------------------------------------------------------------

  def fires(self, step: int) -> bool:
    return self.enabled and step % self.settings.every == 0 and step != self.num_train_steps

  def recording(self, step: int) -> bool:
    """Steps whose routing the next boundary plans from: the `record_steps` steps that
    end `compile_lead_steps` before the boundary."""
    a = self.settings
    if not self.enabled:
      return False
    into_interval = (step - 1) % a.every + 1  # 1..every
    window_end = a.every - a.compile_lead_steps
    return window_end - a.record_steps < into_interval <= window_end

  def accumulate(self, records):
    for name, record in jax.device_get(records).items():
      if name not in self.records:
        self.records[name] = adaptive.RecordAccumulator.empty(
            record.tokens_per_expert.shape[0], record.unrouted_input_sum.shape[0])
      self.records[name].add(record)

  # -- compile ahead ---------------------------------------------------------------------

  def start(self):
    self._compiler = concurrent.futures.ThreadPoolExecutor(1, 'compile-ahead')

  def shutdown(self):
    if self._compiler is not None:
      self._compiler.shutdown(wait=True, cancel_futures=True)

  def maybe_compile_ahead(self, step: int, current: Layout):
    """Once the routing window before a boundary is complete, start compiling the layout
    that boundary will produce."""
    a = self.settings
    if not self.enabled or not a.compile_lead_steps or self._ahead is not None:
      return
    boundary = (step // a.every + 1) * a.every
    if not (boundary - a.compile_lead_steps <= step and boundary < self.num_train_steps):
      return
    layout = self.planned(current)
    future = None
    if layout != current:
      future = self._compiler.submit(self.compile_fn, layout)
      log.info('step %d: routing window complete; compiling %s for the boundary at step %d '
               'in the background', step, layout.describe(), boundary)
    self._ahead = (layout, future)

  def _compiled_for(self, layout: Layout, current: Compiled
                    ) -> Tuple[Compiled, float, bool]:
    """The steps for `layout`, the seconds training waited for them, and whether they
    were compiled ahead. A plan that removes as many experts as it adds keeps the
    shapes, and with them the current steps."""
    ahead, self._ahead = self._ahead, None
    if layout == current.layout:
      return current, 0.0, ahead is not None
    start = time.perf_counter()
    if ahead is not None and ahead[1] is not None and ahead[0] == layout:
      compiled = ahead[1].result()
      return compiled, time.perf_counter() - start, True
    if ahead is not None:
      log.warning('the boundary planned %s, not the %s compiled ahead; compiling now',
                  layout.describe(), ahead[0].describe())
    compiled = self.compile_fn(layout)
    return compiled, compiled.seconds, False

  # -- the boundary itself ---------------------------------------------------------------

  def apply(self, state, step: int, current: Compiled) -> Tuple[Any, Compiled]:
    """Plan from the recorded window, reallocate params and optimizer state when experts
    change, and switch to the new layout's steps (compiled ahead, or now)."""
    a = self.settings
    start = time.perf_counter()
    layout = current.layout
    new_layout = self.planned(layout)
    plans = {}
    if a.enabled:
      host = jax.device_get(state)
      for index, name in enumerate(names.moe_layer_names(layout.experts)):
        record = self.records.get(name)
        if record is None or not record.steps:
          continue
        module = (name, 'moe')
        moe_axes = {path[-1]: axis for path, axis in current.expert_axes.items()
                    if path[:-1] == module}
        rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(self.seed), step), index)
        plans[module] = adaptive.plan_layer(
            record, host.params[name]['moe'], moe_axes, router=self.router,
            kernel_init=layers.MoE.kernel_init, min_experts=a.min_experts,
            max_experts=a.max_experts, new_expert_init=a.new_expert_init, rng=rng)
    self.records = {}
    plan = adaptive.ResizePlan(plans, current.expert_axes)
    if plan.is_noop and new_layout == layout:
      self._ahead = None
      return state, current
    if not plan.is_noop:
      params, opt_state = adaptive.resize(host.params, host.opt_state, plan)
      state = host.replace(params=params, opt_state=opt_state,
                           moe_controls=balance.resized(host.moe_controls, plans))
      for (name, _), layer_plan in plans.items():
        assert layer_plan.new_count == new_layout.experts[names.layer_index(name)]
    plan_seconds = time.perf_counter() - start
    compiled, waited, ahead = self._compiled_for(new_layout, current)
    compile_seconds = 0.0 if compiled is current else compiled.seconds
    if compiled is not current or not plan.is_noop:
      state = jax.device_put(state, compiled.shardings)
    paused = time.perf_counter() - start
    if new_layout == layout:
      how = 'the same shapes as before: the current steps are kept'
    elif ahead:
      how = f'compiled in the background over the last {a.compile_lead_steps} steps'
    else:
      how = 'compiled at the boundary'
    log.info('step %d: %s -> %s; training paused %.2fs (plan + reallocate %.2fs, waiting for '
             'the new steps %.2fs); the new steps took %.2fs to compile, %s', step,
             layout.describe(), new_layout.describe(), paused, plan_seconds, waited,
             compile_seconds, how)
    events = []
    for index, name in enumerate(names.moe_layer_names(layout.experts)):
      block = names.layer_index(name)
      layer_plan = plans.get((name, 'moe'))
      capacity_changed = new_layout.capacity[block] != layout.capacity[block]
      if (layer_plan is None or layer_plan.is_noop) and not capacity_changed:
        continue
      event = {'step': step, 'layer': name, 'experts_before': layout.experts[block],
               'experts_after': new_layout.experts[block],
               'capacity_before': layout.capacity[block],
               'capacity_after': new_layout.capacity[block],
               'capacity_tokens': new_layout.capacity_tokens, 'compiled_ahead': ahead,
               'seconds': paused, 'plan_seconds': plan_seconds,
               'compile_wait_seconds': waited, 'recompile_seconds': compile_seconds}
      if layer_plan is not None:
        event.update(added=layer_plan.num_new, removed=list(layer_plan.removed))
      events.append(event)
    self.metrics.append_adaptation(events)
    return state, compiled
