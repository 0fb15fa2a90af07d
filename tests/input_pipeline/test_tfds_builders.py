"""The TFDS builders and the prepare command on tiny fixture folders in each data set's exact layout.

Checks: a prepared set reads back (tfds.builder_from_directory) as the same DataSource as the raw reader, with the
files' bytes; RegDB split files, LLCM cameras and SYSU ids/cameras/modalities come through; the official SYSU
permutations (a small rand_perm_cam.mat written with scipy) give the galleries worked out by hand; bad input stops
with the path named (or a counted skip); the prepared set feeds the same train / eval batches as the raw one.
"""

import glob
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import scipy.io

from fdnm_jax.evaluation import protocols
from input_pipeline import pipeline, prepare, sources
from input_pipeline.datasets import llcm, regdb, synthetic, sysu, tfds_builders
from input_pipeline.datasets.image_set import INFRARED, VISIBLE
from tests import subprocesses
from tests.input_pipeline import test_llcm, test_sysu

NUM_PIDS_IN_MAT = 20  # person-id entries per camera in the fixture rand_perm_cam.mat (ids 1..20).
# Fixture permutations, (camera, pid) -> rows (trials) of 1-based image numbers; SYSU fixture file names are
# 0007, 0002, 0010 (test_sysu.IMAGE_NAMES). Test ids with images: 12 (cams 1, 2, 3, 5, 6) and 5 (cams 4, 6).
PERM = {(1, 12): [[7], [7]], (2, 12): [[2, 7], [7, 2]], (5, 12): [[7], [7]], (4, 5): [[2, 7], [7, 2]],
        (3, 12): [[10, 2, 7], [2, 7, 10]], (6, 12): [[7], [7]], (6, 5): [[7, 2], [2, 7]]}


def write_rand_perm(root):
  """exp/rand_perm_cam.mat as the SYSU-MM01 repo lays it out: a 6 x 1 cell of (pid x 1) cells of [trials, n]."""
  cams = np.empty((6, 1), dtype=object)
  for cam in range(1, 7):
    entries = np.empty((NUM_PIDS_IN_MAT, 1), dtype=object)
    for pid in range(1, NUM_PIDS_IN_MAT + 1):
      rows = PERM.get((cam, pid))
      entries[pid - 1, 0] = np.array(rows, np.float64) if rows else np.zeros((0, 0))
    cams[cam - 1, 0] = entries
  scipy.io.savemat(os.path.join(root, "exp", "rand_perm_cam.mat"), {"rand_perm_cam": cams})


def _config(dataset, data_dir="", root="", trial=1, sampling="seeded", num_val_ids=0):
  config = ml_collections.ConfigDict()
  config.dataset = dataset
  config.data = ml_collections.ConfigDict({"root": root, "trial": trial, "data_dir": data_dir,
                                           "num_val_ids": num_val_ids})
  config.evals = ml_collections.ConfigDict({"sysu_gallery_sampling": sampling})
  return config


def _rel(image_set, root):
  return tuple(os.path.relpath(p, root).replace(os.sep, "/") for p in image_set.paths)


def _assert_same_sets(prepared, raw, root):
  """Same labels, cameras, modality and relative paths; prepared bytes = the files' bytes."""
  assert prepared.paths == _rel(raw, root)
  np.testing.assert_array_equal(prepared.labels, raw.labels)
  np.testing.assert_array_equal(prepared.cameras, raw.cameras)
  assert prepared.modality == raw.modality
  for data, path in zip(prepared.encoded, raw.paths):
    with open(path, "rb") as f:
      assert data == f.read()


@pytest.fixture(scope="module")
def sysu_prepared(tmp_path_factory):
  root = test_sysu.write_tree(tmp_path_factory.mktemp("sysu") / "SYSU-MM01")
  write_rand_perm(root)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  (folder,) = prepare.prepare("sysu_mm01", root, data_dir, out=open(os.devnull, "w"))
  return root, folder


@pytest.fixture(scope="module")
def regdb_prepared(tmp_path_factory):
  root = synthetic.generate(str(tmp_path_factory.mktemp("regdb") / "RegDB"), num_train_ids=4, num_test_ids=3,
                            images_per_id=2, num_cameras=2, height=32, width=16, seed=0)
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  folders = prepare.prepare("regdb", root, data_dir, splits=(1, 2), out=open(os.devnull, "w"))
  return root, folders


def test_sysu_prepared_source_equals_the_raw_source(sysu_prepared):
  root, folder = sysu_prepared
  raw = sources.load_source(_config("sysu", root=root), "")
  ready = sources.load_source(_config("sysu", data_dir=folder), "")
  assert (ready.name, ready.protocol, ready.directions) == (raw.name, raw.protocol, raw.directions)
  _assert_same_sets(ready.train_visible, raw.train_visible, root)
  _assert_same_sets(ready.train_infrared, raw.train_infrared, root)
  for key in ("visible", "infrared"):
    _assert_same_sets(ready.test_sets[key], raw.test_sets[key], root)
  # ids / cameras / modality from the fixture table, independently of the reader.
  expected_test_vis = test_sysu._expected(test_sysu.TEST_IDS, sysu.RGB_CAMERAS)
  assert [(p, int(i), int(c)) for p, i, c in zip(ready.test_sets["visible"].paths, ready.test_sets["visible"].labels,
                                                  ready.test_sets["visible"].cameras)] == expected_test_vis
  assert ready.test_sets["infrared"].modality == INFRARED and ready.train_visible.modality == VISIBLE
  # The official permutations survive the round trip through the prepared folder.
  assert ready.extras["rand_perm_cam"] == raw.extras["rand_perm_cam"]
  assert ready.extras["rand_perm_cam"]["2"][11] == [[2, 7], [7, 2]]


def test_sysu_official_galleries_per_mode_and_shot(sysu_prepared):
  _, folder = sysu_prepared
  source = sources.load_source(_config("sysu", data_dir=folder, sampling="official"), "")
  settings = {s.name: s for s in protocols.settings_for(source, _config("sysu", sampling="official"))}
  assert all("rand_perm_cam.mat" in s.family for s in settings.values())
  gallery = source.test_sets["visible"]
  # By hand from PERM: first `shot` numbers of row `trial` for (cam, id) on the mode's cameras.
  expected = {
      ("all_search_single_shot", 0): {"cam1/0012/0007.jpg", "cam2/0012/0002.jpg", "cam5/0012/0007.jpg",
                                      "cam4/0005/0002.jpg"},
      ("all_search_single_shot", 1): {"cam1/0012/0007.jpg", "cam2/0012/0007.jpg", "cam5/0012/0007.jpg",
                                      "cam4/0005/0007.jpg"},
      ("all_search_multi_shot", 0): {"cam1/0012/0007.jpg", "cam2/0012/0002.jpg", "cam2/0012/0007.jpg",
                                     "cam5/0012/0007.jpg", "cam4/0005/0002.jpg", "cam4/0005/0007.jpg"},
      ("indoor_search_single_shot", 1): {"cam1/0012/0007.jpg", "cam2/0012/0007.jpg"},
      ("indoor_search_multi_shot", 0): {"cam1/0012/0007.jpg", "cam2/0012/0002.jpg", "cam2/0012/0007.jpg"},
  }
  for (name, trial), names in expected.items():
    idx = protocols.gallery_indices(settings[name], gallery, trial)
    assert {gallery.paths[i] for i in idx} == names, (name, trial)
    assert list(idx) == sorted(idx)  # set order, as MPANet's np.in1d mask
  # Queries: every IR test image of cams 3 and 6, both modes.
  q = source.test_sets["infrared"]
  for s in settings.values():
    assert set(protocols.query_indices(s, q).tolist()) == set(range(len(q)))


def test_official_sampling_without_the_mat_is_a_clear_error(tmp_path):
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  source = sources.load_source(_config("sysu", root=root), "")
  assert "rand_perm_cam" not in source.extras
  with pytest.raises(FileNotFoundError, match="rand_perm_cam.mat"):
    protocols.settings_for(source, _config("sysu", sampling="official"))
  seeded = protocols.settings_for(source, _config("sysu", sampling="seeded"))
  assert all("random.seed(trial)" in s.family for s in seeded)
  gallery = source.test_sets["visible"]
  again = [protocols.gallery_indices(s, gallery, 3).tolist() for s in seeded]
  assert again == [protocols.gallery_indices(s, gallery, 3).tolist() for s in seeded]


def test_regdb_prepared_splits_honour_the_split_files(regdb_prepared):
  root, folders = regdb_prepared
  assert [os.path.basename(os.path.dirname(f)) for f in folders] == ["split_1", "split_2"]
  for trial, folder in zip((1, 2), folders):
    source = sources.load_source(_config("regdb", data_dir=folder, trial=trial), "")
    raw = regdb.read_regdb(root, trial)
    for key, image_set in (("train_visible", source.train_visible), ("train_thermal", source.train_infrared),
                           ("test_visible", source.test_sets["visible"]),
                           ("test_thermal", source.test_sets["infrared"])):
      # The list file itself, read here independently: "<relative path> <label>" per line.
      with open(os.path.join(root, "idx", f"{key}_{trial}.txt")) as f:
        rows = [line.split() for line in f if line.strip()]
      assert image_set.paths == tuple(r[0] for r in rows)
      assert image_set.labels.tolist() == [int(r[1]) for r in rows]
      _assert_same_sets(image_set, raw[key], root)
  # prepare's --data_dir also works: the split of config.data.trial is found in it.
  top = os.path.dirname(os.path.dirname(os.path.dirname(folders[1])))
  by_top = sources.load_source(_config("regdb", data_dir=top, trial=2), "")
  assert by_top.train_visible.paths == sources.load_source(_config("regdb", data_dir=folders[1], trial=2),
                                                           "").train_visible.paths
  with pytest.raises(FileNotFoundError, match="split_3"):
    sources.load_source(_config("regdb", data_dir=top, trial=3), "")
  with pytest.raises(ValueError, match="split 1 but config.data.trial is 2"):
    sources.load_source(_config("regdb", data_dir=folders[0], trial=2), "")
  with pytest.raises(ValueError, match="config.dataset is 'llcm'"):
    sources.load_source(_config("llcm", data_dir=folders[0]), "")


def test_llcm_prepared_cameras(tmp_path):
  root = test_llcm.write_tree(tmp_path / "LLCM")
  (folder,) = prepare.prepare("llcm", root, str(tmp_path / "tfds"), out=open(os.devnull, "w"))
  source = sources.load_source(_config("llcm", data_dir=folder), "")
  assert list(zip(source.train_visible.paths, source.train_visible.cameras.tolist())) == [
      ("vis/cam2/0004/v_0004_c2_02.jpg", 2), ("vis/cam2/0004/v_0004_c2_01.jpg", 2),
      ("vis/cam7/0001/v_0001_c7_01.jpg", 7), ("vis/0009/v_0009_03.jpg", llcm.UNKNOWN_CAMERA)]
  nir = source.test_sets["infrared"]
  assert list(zip(nir.paths, nir.labels.tolist(), nir.cameras.tolist())) == [
      ("test_nir/cam2/0011/b.jpg", 11, 2), ("test_nir/cam4/0030/b.jpg", 30, 4),
      ("test_nir/cam8/0030/a.jpg", 30, 8), ("test_nir/cam8/0030/b.jpg", 30, 8)]
  raw = llcm.read_llcm(root)
  _assert_same_sets(source.test_sets["visible"], raw["test_visible"], root)


def _main(*args, capsys):
  code = prepare.main(list(args))
  return code, capsys.readouterr()


def test_prepare_names_the_missing_root_and_id_file(tmp_path, capsys):
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={tmp_path / 'nope'}", f"--data_dir={tmp_path}",
                    capsys=capsys)
  assert code == 1 and str(tmp_path / "nope") in out.err and "cam1/ cam2/" in out.err  # the expected tree
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  os.remove(os.path.join(root, "exp", "test_id.txt"))
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}", capsys=capsys)
  assert code == 1 and "exp/test_id.txt" in out.err


def test_prepare_names_an_empty_camera_folder(tmp_path, capsys):
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  cam = os.path.join(root, "cam5")
  for pid in os.listdir(cam):
    for name in os.listdir(os.path.join(cam, pid)):
      os.remove(os.path.join(cam, pid, name))
    os.rmdir(os.path.join(cam, pid))
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}", capsys=capsys)
  assert code == 1 and cam in out.err and "empty" in out.err


def test_prepare_names_a_listed_image_that_is_missing(tmp_path, capsys):
  root = synthetic.generate(str(tmp_path / "RegDB"), num_train_ids=2, num_test_ids=2, images_per_id=2,
                            num_cameras=1, height=16, width=8, seed=0)
  with open(os.path.join(root, "idx", "test_thermal_1.txt"), "a") as f:
    f.write("Thermal/99/missing.bmp 7\n")
  code, out = _main("--dataset=regdb", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}", "--splits=1",
                    capsys=capsys)
  assert code == 1 and "Thermal/99/missing.bmp" in out.err and "test_thermal_1.txt" in out.err


@pytest.mark.parametrize("damage", ["empty", "truncated"])
def test_corrupt_image_stops_or_is_skipped_and_counted(tmp_path, capsys, damage):
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  bad = os.path.join(root, "cam3", "0012", "0002.jpg")
  with open(bad, "rb") as f:
    data = f.read()
  with open(bad, "wb") as f:
    f.write(b"" if damage == "empty" else data[:len(data) // 2])
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={tmp_path / 'a'}", capsys=capsys)
  assert code == 1 and bad in out.err and "--skip_corrupt" in out.err
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={tmp_path / 'b'}", "--skip_corrupt",
                    capsys=capsys)
  assert code == 0 and "skipped 1 corrupt image" in out.out
  folder = out.out.split("--config.data.data_dir=")[1].split()[0]
  prepared = tfds_builders.read_prepared(folder)
  raw = sysu.read_sysu(root)
  assert len(prepared.image_set("test", INFRARED)) == len(raw["test_infrared"]) - 1
  assert "cam3/0012/0002.jpg" not in prepared.image_set("test", INFRARED).paths
  assert prepared.metadata["skipped_corrupt"] == ["cam3/0012/0002.jpg"]


def test_prepare_reports_counts_against_the_published_ones(tmp_path, capsys):
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  code, out = _main("--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={tmp_path / 'tfds'}", capsys=capsys)
  assert code == 0
  n_train_ids = len(test_sysu.TRAIN_IDS + test_sysu.VAL_IDS)
  assert f"train_ids = {n_train_ids}, published 395 ({n_train_ids - 395:+,})" in out.out
  assert "rand_perm_cam.mat: absent" in out.out


def test_validation_split_holds_out_the_last_ids(regdb_prepared):
  _, folders = regdb_prepared
  full = sources.load_source(_config("regdb", data_dir=folders[0]), "")
  held = sources.load_source(_config("regdb", data_dir=folders[0], num_val_ids=1), "")
  last = max(set(full.train_visible.labels.tolist()) & set(full.train_infrared.labels.tolist()))
  assert full.validation is None
  val = held.validation
  assert val.protocol == "regdb" and len(val.directions) == 2
  for key, train_set, full_set in (("visible", held.train_visible, full.train_visible),
                                   ("infrared", held.train_infrared, full.train_infrared)):
    assert last not in train_set.labels.tolist()
    assert set(val.test_sets[key].labels.tolist()) == {last}
    assert len(train_set) + len(val.test_sets[key]) == len(full_set)
    assert sorted(train_set.paths + val.test_sets[key].paths) == sorted(full_set.paths)
  assert held.test_sets["visible"].paths == full.test_sets["visible"].paths  # the test set is untouched
  with pytest.raises(ValueError, match="num_val_ids"):
    sources.load_source(_config("regdb", data_dir=folders[0], num_val_ids=99), "")


def test_prepared_sets_feed_the_same_batches_as_the_files(regdb_prepared, input_config):
  root, folders = regdb_prepared
  raw = sources.load_source(_config("regdb", root=root), "")
  ready = sources.load_source(_config("regdb", data_dir=folders[0]), "")
  input_config.num_ids_per_batch = 2
  a = next(pipeline.train_batches(raw.train_visible, raw.train_infrared, input_config, seed=3, start_step=5))
  b = next(pipeline.train_batches(ready.train_visible, ready.train_infrared, input_config, seed=3, start_step=5))
  for key in ("visible", "infrared", "visible_labels", "infrared_labels"):
    np.testing.assert_array_equal(a[key], b[key])
  ea = list(pipeline.eval_batches(raw.test_sets["infrared"], input_config, 4))
  eb = list(pipeline.eval_batches(ready.test_sets["infrared"], input_config, 4))
  for x, y in zip(ea, eb):
    np.testing.assert_array_equal(x["images"], y["images"])
    np.testing.assert_array_equal(x["index"], y["index"])


def test_read_prepared_names_a_folder_that_is_not_prepared(tmp_path):
  with pytest.raises(FileNotFoundError, match="dataset_info.json"):
    tfds_builders.read_prepared(str(tmp_path))


REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY_OVERRIDES = ("--config.input.height=32", "--config.input.width=16", "--config.input.pad=2",
                  "--config.input.num_ids_per_batch=2", "--config.input.num_instances=2",
                  "--config.input.eval_batch_size=16", "--config.model.stage_sizes=(1,1,1,1)",
                  "--config.model.width=8", "--config.schedule.num_epochs=2", "--config.schedule.steps_per_epoch=1",
                  "--config.schedule.warmup_epochs=1", "--config.schedule.decay_epochs=(1,)",
                  "--config.checkpoint.async_save=False", "--config.logging.every_steps=1")


def _tensorboard_tags(workdir: str) -> set[tuple[int, str]]:
  """{(step, tag)} of every summary value in the workdir's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (imported by tests/conftest.py already)
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  files = glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  assert files, f"no TensorBoard event file in {workdir}"
  out = set()
  for record in tf.data.TFRecordDataset(files):
    event = event_pb2.Event.FromString(record.numpy())
    out |= {(event.step, value.tag) for value in event.summary.value}
  return out


@pytest.mark.slow
def test_main_trains_and_evaluates_on_a_prepared_regdb_fixture(regdb_prepared, tmp_path):
  """python main.py --config=configs/regdb.py --config.data.data_dir=<fixture>: 2 steps, validation evals at
  steps 1 and 2 on the held-out id, the final evaluation (last and best on validation) on the test split; every
  value of metrics.jsonl is also in TensorBoard's event file once main.py has exited (it ends without the
  interpreter's teardown: fdnm_jax/process_exit.py)."""
  _, folders = regdb_prepared
  workdir = str(tmp_path / "run")
  env = subprocesses.env(devices=1)
  cmd = [sys.executable, os.path.join(REPO, "main.py"), f"--config={os.path.join(REPO, 'configs', 'regdb.py')}",
         f"--workdir={workdir}", f"--config.data.data_dir={folders[0]}", "--config.data.num_val_ids=1",
         "--config.model.pretrained=none",
         "--config.evals.every_steps=1", *TINY_OVERRIDES]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  with open(os.path.join(workdir, "results", "regdb.json")) as f:
    final = json.load(f)
  with open(os.path.join(workdir, "results", "regdb_validation.json")) as f:
    periodic = json.load(f)
  assert final["eval_split"] == "test" and final["model_selection_split"] == "validation"
  # Validation evaluations at steps 1 and 2 (model selection also scores the last step): the file holds the latest.
  assert periodic["eval_split"] == "validation" and periodic["step"] == 2
  assert [m["label"] for m in final["models"]] == ["last", "best on validation"]
  # Test split of the fixture: 3 ids x 2 images per modality; validation: the 1 held-out id x 2 images.
  assert final["settings"]["visible_to_infrared"]["num_query"] == 6
  assert periodic["settings"]["visible_to_infrared"]["num_query"] == 2
  assert 0.0 <= final["settings"]["visible_to_infrared"]["mAP"] <= 100.0
  assert final["gallery_sampling"]["visible_to_infrared"].startswith("none: the whole test sets of split 1")
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    written = {(row["step"], tag) for row in map(json.loads, f) for tag in row if tag != "step"}
  assert (2, "selection/validation_mAP") in written and (1, "train/total") in written
  assert written <= _tensorboard_tags(workdir)
