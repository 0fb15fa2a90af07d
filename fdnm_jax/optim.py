"""The paper's optimiser: SGD (momentum, Nesterov, L2 weight decay) with two learning rates
and the per-epoch warm-up + step-decay schedule (FDNM_SPEC.md §3).
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

HEAD_PREFIXES = ("bnneck", "classifier")  # top-level param names trained with optim.head_lr.


def lr_factor_fn(schedule: ml_collections.ConfigDict, steps_per_epoch: int) -> Callable[[Any], Any]:
  """Multiplier of the base learning rate at a step (per-epoch, as DEEN's `adjust_learning_rate`).

  epoch = step // steps_per_epoch; factor = (epoch+1)/warmup_epochs while epoch < warmup_epochs,
  else decay_factor ** (number of decay_epochs <= epoch). On a traced or JAX array (the optimiser's step count)
  it is a float32 array; on a Python or NumPy integer (the host's logging) the same rule in Python floats, so the
  host dispatches no device ops for it (each would compile a program once per process).
  """
  warmup = schedule.warmup_epochs
  decay_epochs = tuple(schedule.decay_epochs)
  decay = schedule.decay_factor

  def factor(step):
    if isinstance(step, (int, np.integer)):
      epoch = int(step) // steps_per_epoch
      if warmup > 0 and epoch < warmup:
        return (epoch + 1) / warmup
      return float(decay ** sum(epoch >= d for d in decay_epochs))
    epoch = jnp.asarray(step) // steps_per_epoch
    num_decays = sum((epoch >= d).astype(jnp.float32) for d in decay_epochs) if decay_epochs else 0.0
    stepped = jnp.power(decay, num_decays)
    if warmup > 0:
      warm = (epoch + 1).astype(jnp.float32) / warmup
      return jnp.where(epoch < warmup, warm, stepped)
    return jnp.asarray(stepped, jnp.float32)

  return factor


def param_group_labels(params: Any) -> Any:
  """A pytree like `params` labelling each leaf "head" (BNNeck, classifier) or "backbone"."""
  return {name: jax.tree.map(lambda _, g=("head" if name.startswith(HEAD_PREFIXES) else "backbone"): g, sub)
          for name, sub in params.items()}


def make_optimizer(optim: ml_collections.ConfigDict, schedule: ml_collections.ConfigDict,
                   steps_per_epoch: int) -> optax.GradientTransformation:
  """SGD as PyTorch's `SGD(momentum, nesterov, weight_decay)`: g += wd*p; buf = m*buf + g;
  update = g + m*buf (Nesterov) or buf; p -= lr * update, with lr = group_lr * schedule factor.
  """
  factor = lr_factor_fn(schedule, steps_per_epoch)

  def sgd(lr: float) -> optax.GradientTransformation:
    parts = []
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(optim.weight_decay))
    if optim.momentum:
      parts.append(optax.trace(decay=optim.momentum, nesterov=optim.nesterov))
    parts.append(optax.scale_by_schedule(lambda count: -lr * factor(count)))
    return optax.chain(*parts)

  return optax.multi_transform({"backbone": sgd(optim.base_lr), "head": sgd(optim.head_lr)},
                               param_group_labels)
