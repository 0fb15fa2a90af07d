"""TensorFlow imported without the Keras import that `import tensorflow` ends with.

TensorFlow 2.21's `__init__` finishes with an eager `import keras.src.optimizers` (for SavedModel registrations)
inside `try: ... except ImportError: pass`. That import is 1.7 s of the 4.5 s `import tensorflow` on a 2-core
AVX-512 machine (it pulls in Keras 3, scikit-learn and scipy.stats), paid by every `main.py` start and every test
process, and fdnm-jax uses none of it (tf.data, tf.io and tf.image only). `load()` imports TensorFlow with the
`keras` package hidden (TensorFlow then takes the branch it takes when Keras is not installed), unhides it, and
puts back the Keras folders TensorFlow adds to its package path, so `tf.keras` and `import tensorflow.keras` still
load Keras on first use.

The second eager Keras import is TensorBoard's: `clu.metric_writers` imports `tensorboard.plugins.hparams.api`,
whose `_keras` module defines `Callback(tf.keras.callbacks.Callback)` at import time (1.8 s more per process, the
same Keras). `load()` registers a stand-in `_keras` whose `Callback` loads the real module when it is first
instantiated; fdnm-jax writes summaries with clu and never uses `hparams.KerasCallback`.
"""

import os
import sys
from types import ModuleType


def load() -> ModuleType:
  """Imports TensorFlow (once per process) without its eager Keras import; returns the `tensorflow` module.

  Call it before anything else imports TensorFlow; once TensorFlow is imported it returns that module as it is.
  """
  if "tensorflow" in sys.modules:
    return sys.modules["tensorflow"]
  if "keras" in sys.modules:  # Keras is already paid for: nothing to save.
    import tensorflow  # pylint: disable=g-import-not-at-top
    return tensorflow
  sys.modules["keras"] = None  # `import keras` now raises ImportError, which TensorFlow's __init__ catches.
  try:
    import tensorflow  # pylint: disable=g-import-not-at-top
  finally:
    if sys.modules.get("keras", 0) is None:
      del sys.modules["keras"]
  _restore_keras_path(tensorflow)
  _defer_hparams_keras_callback()
  return tensorflow


_HPARAMS_KERAS = "tensorboard.plugins.hparams._keras"


def _defer_hparams_keras_callback() -> None:
  """Registers a stand-in for tensorboard.plugins.hparams._keras (unless it is imported already): its `Callback`,
  when instantiated, imports the real module (and so Keras) and returns the real callback."""
  if _HPARAMS_KERAS in sys.modules:
    return
  stand_in = ModuleType(_HPARAMS_KERAS, "Stand-in of TensorBoard's hparams Keras callback (fdnm_jax.tensorflow_import)")

  class Callback:  # pylint: disable=too-few-public-methods
    """hparams.KerasCallback, loaded (with Keras) when first instantiated."""

    def __new__(cls, *args, **kwargs):
      if sys.modules.get(_HPARAMS_KERAS) is stand_in:
        del sys.modules[_HPARAMS_KERAS]
      import importlib  # pylint: disable=g-import-not-at-top
      return importlib.import_module(_HPARAMS_KERAS).Callback(*args, **kwargs)

  stand_in.Callback = Callback
  sys.modules[_HPARAMS_KERAS] = stand_in


def _restore_keras_path(tensorflow: ModuleType) -> None:
  """Replaces the None entries TensorFlow put on its `__path__` (Keras hidden) with the folders it adds when Keras
  is importable: <keras>/api/_v2 (tf_keras/api/_v2 under TF_USE_LEGACY_KERAS) before <keras>/_tf_keras."""
  from tensorflow.python.tools import module_util  # pylint: disable=g-import-not-at-top
  legacy = os.environ.get("TF_USE_LEGACY_KERAS", None) in ("true", "True", "1")
  api = module_util.get_parent_dir_for_name("tf_keras.api._v2.keras" if legacy else "keras.api._v2.keras")
  folders = [api, module_util.get_parent_dir_for_name("keras._tf_keras.keras")]
  path = list(tensorflow.__path__)
  for folder in folders:
    if None in path:
      path[path.index(None)] = folder
  tensorflow.__path__ = [p for p in path if p is not None]
