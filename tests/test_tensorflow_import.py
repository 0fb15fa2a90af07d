"""fdnm_jax/tensorflow_import.py: TensorFlow without its eager Keras import, and otherwise the TensorFlow a plain
`import tensorflow` gives (its package path with Keras's folders, tf.data, tf.keras on first use), in a fresh
process."""

import importlib.util
import json
import os
import subprocess
import sys

from tests import subprocesses

_PROBE = """
import json, sys
from fdnm_jax import tensorflow_import
tf = tensorflow_import.load()
assert tensorflow_import.load() is tf
after_import = {m: m in sys.modules for m in ("keras", "sklearn")}
path = list(tf.__path__)
data = [int(x) for x in tf.data.Dataset.range(4).map(lambda x: 3 * x).as_numpy_iterator()]
units = tf.keras.layers.Dense(2).units
print(json.dumps({"after_import": after_import, "path": path, "data": data, "units": units,
                  "keras_loaded_later": "keras" in sys.modules}))
"""


def test_load_skips_keras_and_leaves_tensorflow_as_a_plain_import_makes_it():
  proc = subprocess.run([sys.executable, "-c", _PROBE], cwd=subprocesses.REPO, env=subprocesses.env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  got = json.loads(proc.stdout.strip().splitlines()[-1])
  assert got["after_import"] == {"keras": False, "sklearn": False}
  # TensorFlow 2.21's own __init__ puts <keras>/api/_v2 and <keras>/_tf_keras before its folder (Keras 3 installed).
  keras = os.path.dirname(importlib.util.find_spec("keras").origin)
  tensorflow = os.path.dirname(importlib.util.find_spec("tensorflow").origin)
  assert got["path"][:2] == [os.path.join(keras, "api", "_v2"), os.path.join(keras, "_tf_keras")]
  assert tensorflow in got["path"] and None not in got["path"]
  assert got["data"] == [0, 3, 6, 9]
  assert got["units"] == 2 and got["keras_loaded_later"]  # tf.keras still imports Keras when it is used.
