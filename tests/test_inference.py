"""Feature extraction end to end on the tiny synthetic run: files, index rows, and equality with the evaluator.

`trained_workdir()` is the session's finished tiny run (tests/shared_runs.py: trained once per test session, 4
steps); test_visualize.py reuses it.
"""

import functools
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import default
from fdnm_jax import checkpoints, inference, sharding, train
from fdnm_jax.evaluation import evaluator
from tests import shared_runs, subprocesses
from tests.configs import tiny

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def trained_workdir() -> str:
  """A tiny run trained to its final step 4 (checkpoints at 2 and 4): the session's, checked unchanged; read only."""
  return shared_runs.tiny()[0]


@functools.lru_cache(maxsize=None)
def evaluator_embeddings(eval_batch_size: int = 16) -> dict:
  """The test-set embeddings as the training run's evaluator computes them: the whole train state restored by the
  resume path (the training source, the optimizer's abstract state), then `evaluator.embed_test_sets`. Independent
  of the variables-only restore that extract, eval and visualize share."""
  config = tiny.get_config()
  config.input.eval_batch_size = eval_batch_size
  workdir = trained_workdir()
  mesh = sharding.make_mesh(config.mesh)
  run = train.build_run(config, workdir, mesh)
  manager = checkpoints.make_manager(workdir, config.checkpoint, read_only=True)
  state, _ = checkpoints.restore(manager, run.abstract_state, 4)
  manager.close()
  return run.source, evaluator.embed_test_sets(run.model, train.variables_of(state), run.source, config, mesh)


def _read_lines(path):
  with open(path) as f:
    return f.read().splitlines()


@pytest.mark.slow
def test_main_extract_writes_features_equal_to_the_evaluator_rows_in_list_order(tmp_path):
  workdir = trained_workdir()
  source, want = evaluator_embeddings()
  infrared = source.test_sets["infrared"]
  order = np.random.default_rng(0).permutation(len(infrared))
  # A list file: relative paths (to the list's folder), a comment and a blank line; shuffled order.
  os.symlink(os.path.dirname(os.path.dirname(infrared.paths[0])), tmp_path / "ir")
  rel = [os.path.join("ir", *infrared.paths[i].split(os.sep)[-2:]) for i in order]
  (tmp_path / "list.txt").write_text("# my crops\n" + "\n".join(rel[:5]) + "\n\n" + "\n".join(rel[5:]) + "\n")
  out = tmp_path / "feats"
  env = subprocesses.env(devices=1)
  proc = subprocess.run([sys.executable, os.path.join(REPO, "main.py"), "--mode=extract", f"--workdir={workdir}",
                         f"--images={tmp_path / 'list.txt'}", "--modality=infrared", f"--out={out}"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "embed infrared: 16/16 (100%)" in proc.stderr  # the progress line.

  features = np.load(out / "features.npy")
  assert features.dtype == np.float32 and features.shape == (len(infrared), want["infrared"].shape[1])
  lines = _read_lines(out / "index.tsv")
  assert lines[0] == "row\tpath\tmodality"
  rows = [line.split("\t") for line in lines[1:]]
  assert [int(r[0]) for r in rows] == list(range(len(infrared)))
  assert [r[1] for r in rows] == [os.path.normpath(str(tmp_path / p)) for p in rel]
  assert {r[2] for r in rows} == {"infrared"}
  # Row i is the evaluator's embedding of the image the index names (same transform, batch and jitted fn).
  np.testing.assert_array_equal(features, want["infrared"][order])


@pytest.mark.slow
def test_embed_paths_over_several_batches_equals_the_evaluator():
  source, want = evaluator_embeddings(eval_batch_size=4)  # 16 images -> 4 batches.
  config = tiny.get_config()
  config.input.eval_batch_size = 4
  config_json, model, variables = inference.load_model(trained_workdir(), checkpoint="4", config=config)
  assert config_json is config
  assert model.num_classes == config.synthetic.num_train_ids  # the classifier width, read from the checkpoint.
  visible = source.test_sets["visible"]
  got = inference.embed_paths(model, variables, visible.paths, "visible", config)
  np.testing.assert_array_equal(got, want["visible"])
  # The workdir's own config.json (what training wrote) builds the same model.
  loaded = inference.load_config(trained_workdir())
  assert tuple(loaded.model.stage_sizes) == (1, 1, 1, 1) and loaded.model.agp_stages == config.model.agp_stages


def test_list_images_walks_folders_and_names_missing_files(tmp_path):
  for name in ("b/2.PNG", "a.jpg", "b/c/3.bmp", "notes.txt", "b/x.npy"):
    (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
    (tmp_path / name).write_bytes(b"")
  assert inference.list_images(str(tmp_path)) == [str(tmp_path / p) for p in ("a.jpg", "b/2.PNG", "b/c/3.bmp")]
  (tmp_path / "l.txt").write_text("a.jpg\nb/missing.png\n")
  with pytest.raises(FileNotFoundError, match=r"1 listed file\(s\) not found, first .*b/missing.png"):
    inference.list_images(str(tmp_path / "l.txt"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match="no image files"):
    inference.list_images(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no such folder or list file"):
    inference.list_images(str(tmp_path / "nope"))


def test_extract_bad_input_errors_name_the_thing(tmp_path):
  (tmp_path / "a.png").write_bytes(b"")
  with pytest.raises(ValueError, match="--modality='thermal': use visible or infrared"):
    inference.extract(str(tmp_path), str(tmp_path), "thermal", str(tmp_path / "o"))
  with pytest.raises(FileNotFoundError, match=r"config.json not found: --workdir must be a training run"):
    inference.extract(str(tmp_path), str(tmp_path), "visible", str(tmp_path / "o"))


def test_write_and_read_index_with_labels(tmp_path):
  feats = np.arange(6, dtype=np.float64).reshape(3, 2)
  files = inference.write_features(str(tmp_path), feats, ["/x/a.png", "/x/b.png", "/y/c.png"], "visible",
                                   labels=[5, 5, 7], cameras=[1, 2, 1])
  assert np.load(files["features"]).dtype == np.float32
  np.testing.assert_array_equal(np.load(files["features"]), feats)
  rows = inference.read_index(files["index"])
  assert rows[2] == {"row": 2, "path": "/y/c.png", "modality": "visible", "label": 7, "camera": 1}
  with pytest.raises(ValueError, match="3 feature rows for 2 paths"):
    inference.write_features(str(tmp_path), feats, ["/a", "/b"], "visible")


def test_load_config_fills_fields_an_older_run_lacks(tmp_path):
  (tmp_path / "config.json").write_text('{"name": "old", "model": {"width": 3, "agp_stages": [2]}}')
  config = inference.load_config(str(tmp_path))
  assert config.name == "old" and config.model.width == 3 and config.model.agp_stages == (2,)
  assert config.model.stage_sizes == (3, 4, 6, 3)  # configs/default.py's ResNet-50, kept where the file is silent.
  assert config.visualize.top_k == 10 and config.evals.test_flip is default.get_config().evals.test_flip
