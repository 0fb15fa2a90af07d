"""fdnm_jax/tensorflow_import.py: TensorFlow without its eager Keras import, and otherwise the TensorFlow a plain
`import tensorflow` gives (its package path with Keras's folders, tf.data, tf.keras on first use), and clu's
metric writers without Keras (TensorBoard's hparams Keras callback loaded when used), in a fresh process."""

import importlib.util
import json
import os
import subprocess
import sys

from tests import subprocesses

_PROBE = """
import json, sys, tempfile
from fdnm_jax import tensorflow_import
tf = tensorflow_import.load()
assert tensorflow_import.load() is tf
after_import = {m: m in sys.modules for m in ("keras", "sklearn")}
from clu import metric_writers  # imports TensorBoard's hparams API and its Keras callback module.
after_clu = "keras" in sys.modules
path = list(tf.__path__)
data = [int(x) for x in tf.data.Dataset.range(4).map(lambda x: 3 * x).as_numpy_iterator()]
units = tf.keras.layers.Dense(2).units
keras_loaded_later = "keras" in sys.modules
from tensorboard.plugins import hparams
callback = hparams.api.KerasCallback(tempfile.mkdtemp(), {"lr": 0.1})
hparams_callback = isinstance(callback, tf.keras.callbacks.Callback)
print(json.dumps({"after_import": after_import, "after_clu": after_clu, "hparams_callback": hparams_callback,
                  "path": path, "data": data, "units": units, "keras_loaded_later": keras_loaded_later}))
"""


def test_load_skips_keras_and_leaves_tensorflow_as_a_plain_import_makes_it():
  proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=subprocesses.REPO, env=subprocesses.env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["after_import"] == {"keras": False, "sklearn": False}
  assert got["after_clu"] is False  # clu's summary writer no longer imports Keras through TensorBoard's hparams.
  assert got["hparams_callback"] is True  # TensorBoard's hparams Keras callback still works when used.
  # TensorFlow 2.21's own __init__ puts <keras>/api/_v2 and <keras>/_tf_keras before its folder (Keras 3 installed).
  keras = os.path.dirname(importlib.util.find_spec("keras").origin)
  tensorflow = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
  assert got["path"][:2] == [os.path.join(keras, "api", "_v2"), os.path.join(keras, "_tf_keras")]
  assert tensorflow in got["path"] and None not in got["path"]
  assert got["data"] == [0, 3, 6, 9]
  assert got["units"] == 2 and got["keras_loaded_later"]  # tf.keras still imports Keras when it is used.
