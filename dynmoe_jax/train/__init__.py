"""Training: the train state, pure step builders, layout boundaries, metrics, and
the trainer that runs them (`Trainer`, `train_and_evaluate`).

  state.py        TrainState, make_init
  steps.py        task_loss, make_train_step, make_eval_step (explicit arguments)
  compiled.py     a layout's model, shardings and AOT-compiled steps
  boundary.py     routing records -> plan -> compile ahead -> resize -> switch
  metrics_log.py  train/eval rows -> metrics.jsonl and TensorBoard
  trainer.py      the run: restore or init, the loop of periodic actions, faults
"""
from dynmoe_jax.train.compiled import Compiled, compile_layout
from dynmoe_jax.train.state import TrainState
from dynmoe_jax.train.steps import (example_losses, make_eval_step, make_train_step,
                                    model_inputs, nonfinite_report, task_loss)
from dynmoe_jax.train.trainer import NonFiniteError, Trainer, train_and_evaluate

__all__ = ['Compiled', 'compile_layout', 'TrainState', 'example_losses', 'make_eval_step', 'make_train_step',
           'model_inputs', 'nonfinite_report', 'task_loss', 'NonFiniteError', 'Trainer',
           'train_and_evaluate']
