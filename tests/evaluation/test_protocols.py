"""Protocol settings and the trial runner against re-implementations of AGW's and DEEN's gallery code.

The references below are AGW's `process_gallery_sysu` / `process_query_sysu` and DEEN's `process_gallery_llcm`,
rewritten from their published procedure (global `random.seed(trial)`, `os.listdir` + `sorted`, `random.choice`)
and run on real folders of empty files in the data sets' layouts. Multi-shot uses `random.sample(files,
min(10, len(files)))` in the same stream (our documented choice: AGW and DEEN have no multi-shot).
"""

import os
import random

import ml_collections
import numpy as np
import pytest

from fdnm_jax.evaluation import compute_metrics, protocols, re_ranking
from fdnm_jax.evaluation.evaluator import score_directions
from input_pipeline.datasets.image_set import INFRARED, VISIBLE, ImageSet
from input_pipeline.sources import DataSource, EvalDirection

SYSU_IDS = (33, 5, 140, 12)  # test ids, not sorted: the procedure sorts them.
# Images per (id, camera): 0 = no folder; 3 and 9 (< 10) and 10, 13 (>= 10) exercise multi-shot.
SYSU_COUNTS = {1: (3, 10, 0, 13), 2: (13, 1, 9, 2), 3: (4, 2, 3, 1), 4: (0, 12, 3, 10), 5: (9, 0, 11, 1),
               6: (2, 3, 0, 5)}
LLCM_IDS = (7, 2, 19)
LLCM_CAMS = {"test_vis": (1, 2, 3, 4, 5, 6, 7, 8, 9), "test_nir": (1, 2, 4, 5, 6, 7, 8, 9)}
EMBED_DIM = 8


def _make_files(folder, count, rng):
  """`count` empty .jpg files with distinct random 4-digit names (so listdir order is not the sorted order)."""
  os.makedirs(folder)
  paths = []
  for name in rng.choice(9999, size=count, replace=False) + 1:
    path = folder + "/" + f"{name:04d}.jpg"
    open(path, "w").close()
    paths.append(path)
  return paths


def _image_set(records, modality, rng):
  """An ImageSet of (path, pid, cam) records, shuffled (a reader may list files in any order)."""
  records = [records[i] for i in rng.permutation(len(records))]
  return ImageSet(tuple(r[0] for r in records), np.array([r[1] for r in records]), np.array([r[2] for r in records]),
                  modality)


def _empty_train_set(modality):
  return ImageSet((), np.zeros(0), np.zeros(0), modality)


@pytest.fixture(scope="module")
def sysu(tmp_path_factory):
  """A SYSU-MM01-like test split on disk: cam<c>/<pid:04d>/<img>.jpg, and its DataSource."""
  root = str(tmp_path_factory.mktemp("sysu"))
  rng = np.random.default_rng(0)
  records = {VISIBLE: [], INFRARED: []}
  for cam, counts in SYSU_COUNTS.items():
    for pid, count in zip(SYSU_IDS, counts):
      if count:
        paths = _make_files(os.path.join(root, f"cam{cam}", f"{pid:04d}"), count, rng)
        records[INFRARED if cam in (3, 6) else VISIBLE] += [(p, pid, cam) for p in paths]
  sets = {"visible": _image_set(records[VISIBLE], VISIBLE, rng),
          "infrared": _image_set(records[INFRARED], INFRARED, rng)}
  source = DataSource("sysu", "sysu", _empty_train_set(VISIBLE), _empty_train_set(INFRARED), sets,
                      (EvalDirection("infrared_to_visible", "infrared", "visible"),))
  return root, source


@pytest.fixture(scope="module")
def llcm(tmp_path_factory):
  """An LLCM-like test split on disk: test_vis/cam<c>/<pid:04d>/*, test_nir/cam<c>/<pid:04d>/*, and its DataSource."""
  root = str(tmp_path_factory.mktemp("llcm"))
  rng = np.random.default_rng(1)
  sets = {}
  for folder, name, modality in (("test_vis", "visible", VISIBLE), ("test_nir", "infrared", INFRARED)):
    records = []
    for cam in LLCM_CAMS[folder]:
      for pid in LLCM_IDS:
        count = int(rng.integers(0, 4))
        if count:
          paths = _make_files(os.path.join(root, folder, f"cam{cam}", f"{pid:04d}"), count, rng)
          records += [(p, pid, cam) for p in paths]
    sets[name] = _image_set(records, modality, rng)
  source = DataSource("llcm", "llcm", _empty_train_set(VISIBLE), _empty_train_set(INFRARED), sets,
                      (EvalDirection("visible_to_infrared", "visible", "infrared"),
                       EvalDirection("infrared_to_visible", "infrared", "visible")))
  return root, source


def _with_global_random(fn):
  """Runs a reference that seeds Python's global `random` (as AGW does) without leaking the state."""
  state = random.getstate()
  try:
    return fn()
  finally:
    random.setstate(state)


def agw_process_gallery_sysu(data_path, ids, mode, trial, shot):
  """AGW data_manager.process_gallery_sysu (multi-shot: random.sample of at most 10)."""

  def run():
    random.seed(trial)
    rgb_cameras = ["cam1", "cam2", "cam4", "cam5"] if mode == "all" else ["cam1", "cam2"]
    files_rgb = []
    for id in sorted("%04d" % x for x in ids):  # pylint: disable=redefined-builtin
      for cam in rgb_cameras:
        img_dir = os.path.join(data_path, cam, id)
        if os.path.isdir(img_dir):
          new_files = sorted([img_dir + "/" + i for i in os.listdir(img_dir)])
          if shot == "single":
            files_rgb.append(random.choice(new_files))
          else:
            files_rgb.extend(random.sample(new_files, min(10, len(new_files))))
    return files_rgb

  return _with_global_random(run)


def agw_process_query_sysu(data_path, ids, mode):
  """AGW data_manager.process_query_sysu: cams 3 and 6 whatever the mode ("all" or "indoor")."""
  assert mode in ("all", "indoor")
  ir_cameras = ["cam3", "cam6"]
  files_ir = []
  for id in sorted("%04d" % x for x in ids):  # pylint: disable=redefined-builtin
    for cam in ir_cameras:
      img_dir = os.path.join(data_path, cam, id)
      if os.path.isdir(img_dir):
        files_ir.extend(sorted([img_dir + "/" + i for i in os.listdir(img_dir)]))
  return files_ir


def deen_process_gallery_llcm(data_path, ids, mode, trial):
  """DEEN data_manager.process_gallery_llcm: mode 1 = visible gallery, 2 = near-infrared gallery."""

  def run():
    random.seed(trial)
    if mode == 1:
      cameras = [f"test_vis/cam{c}" for c in (1, 2, 3, 4, 5, 6, 7, 8, 9)]
    else:
      cameras = [f"test_nir/cam{c}" for c in (1, 2, 4, 5, 6, 7, 8, 9)]
    files = []
    for id in sorted("%04d" % x for x in ids):  # pylint: disable=redefined-builtin
      for cam in cameras:
        img_dir = os.path.join(data_path, cam, id)
        if os.path.isdir(img_dir):
          files.append(random.choice(sorted([img_dir + "/" + i for i in os.listdir(img_dir)])))
    return files

  return _with_global_random(run)


def _paths(image_set, indices):
  return [image_set.paths[i] for i in indices]


def _embeddings(source, seed=0):
  rng = np.random.default_rng(seed)
  return {name: rng.normal(size=(len(s), EMBED_DIM)).astype(np.float32) for name, s in source.test_sets.items()}


def _config(trial=1):
  config = ml_collections.ConfigDict()
  config.data = ml_collections.ConfigDict({"trial": trial})
  return config


@pytest.mark.parametrize("mode", ["all", "indoor"])
@pytest.mark.parametrize("shot", ["single", "multi"])
def test_sysu_gallery_is_agws_draw_for_every_trial(sysu, mode, shot):
  root, source = sysu
  g = source.test_sets["visible"]
  galleries = []
  for trial in protocols.TRIALS:
    got = _paths(g, protocols.sysu_gallery(g.labels, g.cameras, g.paths, mode, shot, trial))
    assert got == agw_process_gallery_sysu(root, SYSU_IDS, mode, trial, shot), f"trial {trial}"
    galleries.append(got)
  assert len({tuple(x) for x in galleries}) > 1, "the trials should draw different galleries"


@pytest.mark.parametrize("mode, cams", [("all", (1, 2, 4, 5)), ("indoor", (1, 2))])
def test_sysu_gallery_cameras_and_images_per_identity_and_camera(sysu, mode, cams):
  _, source = sysu
  g = source.test_sets["visible"]
  available = {(pid, cam): n for cam, counts in SYSU_COUNTS.items() if cam in cams
               for pid, n in zip(SYSU_IDS, counts) if n}
  for shot, want in (("single", lambda n: 1), ("multi", lambda n: min(10, n))):
    idx = protocols.sysu_gallery(g.labels, g.cameras, g.paths, mode, shot, trial=3)
    assert len(set(idx.tolist())) == len(idx), "an image was drawn twice"
    drawn = {}
    for i in idx:
      key = (int(g.labels[i]), int(g.cameras[i]))
      drawn[key] = drawn.get(key, 0) + 1
    assert drawn == {key: want(n) for key, n in available.items()}, shot


@pytest.mark.parametrize("mode", ["all", "indoor"])
def test_sysu_queries_are_every_cam3_and_cam6_image_in_both_modes(sysu, mode):
  root, source = sysu
  q = source.test_sets["infrared"]
  got = sorted(_paths(q, protocols.sysu_query(q.cameras)))
  assert got == sorted(agw_process_query_sysu(root, SYSU_IDS, mode))
  settings = [s for s in protocols.settings_for(source, _config()) if s.name.startswith(mode)]
  assert len(settings) == 2
  for s in settings:
    assert sorted(_paths(q, protocols.query_indices(s, q))) == got  # no trial argument: fixed across trials.


def test_sysu_settings_are_all_and_indoor_single_and_multi_shot_over_ten_trials(sysu):
  _, source = sysu
  settings = protocols.settings_for(source, _config())
  assert [s.name for s in settings] == ["all_search_single_shot", "all_search_multi_shot",
                                        "indoor_search_single_shot", "indoor_search_multi_shot"]
  for s in settings:
    assert (s.query, s.gallery, s.protocol, s.query_cameras) == ("infrared", "visible", "sysu", (3, 6))
    assert s.trials == tuple(range(10))
    assert s.shot == (1 if "single" in s.name else 10)
    assert s.gallery_cameras == ((1, 2, 4, 5) if s.name.startswith("all") else (1, 2))
    assert "random.seed(trial)" in s.family


def test_llcm_both_directions_draw_one_image_per_identity_and_camera_like_deen(llcm):
  root, source = llcm
  settings = protocols.settings_for(source, _config())
  assert [(s.name, s.query, s.gallery, s.protocol) for s in settings] == [
      ("visible_to_infrared", "visible", "infrared", "llcm"), ("infrared_to_visible", "infrared", "visible", "llcm")]
  for s in settings:
    q, g = source.test_sets[s.query], source.test_sets[s.gallery]
    assert s.trials == tuple(range(10))
    np.testing.assert_array_equal(protocols.query_indices(s, q), np.arange(len(q)))  # every query-modality image.
    for trial in (0, 4, 9):
      idx = protocols.gallery_indices(s, g, trial)
      assert _paths(g, idx) == deen_process_gallery_llcm(root, LLCM_IDS, 1 if s.gallery == "visible" else 2, trial)
      pairs = [(int(g.labels[i]), int(g.cameras[i])) for i in idx]
      assert sorted(pairs) == sorted(set(zip(g.labels.tolist(), g.cameras.tolist())))  # one per (id, cam).
    np.testing.assert_array_equal(protocols.llcm_gallery(g.labels, g.cameras, g.paths, 4),
                                  protocols.gallery_indices(s, g, 4))


def _reference_trial(source, embeddings, setting, gallery_paths, rerank=None):
  """Numbers of one trial from the reference gallery paths, NumPy distances and compute_metrics."""
  q, g = source.test_sets[setting.query], source.test_sets[setting.gallery]
  q_idx = np.flatnonzero(np.isin(q.cameras, setting.query_cameras)) if setting.query_cameras else np.arange(len(q))
  position = {p: i for i, p in enumerate(g.paths)}
  g_idx = np.array([position[p] for p in gallery_paths])
  # AGW / DEEN: distmat = query_feat @ gall_feat.T of the embeddings as given (no re-normalisation).
  qe = embeddings[setting.query][q_idx].astype(np.float64)
  ge = embeddings[setting.gallery][g_idx].astype(np.float64)
  dist = (-(qe @ ge.T)).astype(np.float32)
  if rerank is not None:
    euclid = lambda a, b: np.sqrt(np.maximum(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1), 0))
    dist = re_ranking(euclid(qe, ge), euclid(qe, qe), euclid(ge, ge), *rerank).astype(np.float32)
  m = compute_metrics(dist, q.labels[q_idx], g.labels[g_idx], q.cameras[q_idx], g.cameras[g_idx], setting.protocol)
  return {"rank1": m["cmc"][0], "rank5": m["cmc"][4], "rank10": m["cmc"][9], "rank20": m["cmc"][19],
          "mAP": m["mAP"], "mINP": m["mINP"]}


def test_runner_mean_and_std_are_over_the_per_trial_numbers(sysu):
  root, source = sysu
  embeddings = _embeddings(source)
  settings = [s for s in protocols.settings_for(source, _config()) if s.name in ("all_search_single_shot",
                                                                                   "indoor_search_multi_shot")]
  results = protocols.run_protocols(source, embeddings, settings)
  assert list(results) == ["all_search_single_shot", "indoor_search_multi_shot"]
  for s in settings:
    mode, shot = s.name.split("_")[0], s.name.split("_")[2]
    r = results[s.name]
    want = [_reference_trial(source, embeddings, s, agw_process_gallery_sysu(root, SYSU_IDS, mode, t, shot))
            for t in s.trials]
    assert [t["trial"] for t in r["per_trial"]] == list(range(10))
    assert r["num_query"] == sum(SYSU_COUNTS[3]) + sum(SYSU_COUNTS[6])
    assert r["gallery_sampling"] == s.family
    # The numbers depend on the distances only through the ranks. The run's float32 distances and the reference's
    # float64 ones rounded to float32 rank alike (no two distances of a query within float32 rounding of each
    # other), so compute_metrics runs the same program on the same ranks: the same floats, the same 100 x, the
    # same np.mean / np.std of them. Compared exactly.
    for k in protocols.METRICS:
      per_trial = np.array([100 * w[k] for w in want])
      np.testing.assert_array_equal([t[k] for t in r["per_trial"]], per_trial, err_msg=f"{s.name} {k}")
      assert r["mean"][k] == np.mean(per_trial)
      assert r["std"][k] == np.std(per_trial)
    assert np.std([t["mAP"] for t in r["per_trial"]]) > 0, "different galleries should score differently"


def test_runner_with_re_ranking_scores_the_re_ranked_distances(llcm):
  root, source = llcm
  embeddings = _embeddings(source, seed=1)
  setting = protocols.settings_for(source, _config())[1]
  setting = protocols.Setting(**{**setting.__dict__, "trials": (0, 5)})
  rerank = protocols.Rerank(k1=4, k2=2, lambda_value=0.3)
  r = protocols.run_protocols(source, embeddings, [setting], rerank=rerank)[setting.name]
  for got, trial in zip(r["per_trial"], (0, 5)):
    want = _reference_trial(source, embeddings, setting, deen_process_gallery_llcm(root, LLCM_IDS, 1, trial),
                            rerank)
    # Re-ranked from the run's float32 Euclidean distances and from the reference's float64 ones: the float32
    # re-ranked distances rank alike, so the numbers are the same floats (as in the test above). Compared exactly.
    for k in protocols.METRICS:
      assert got[k] == 100 * want[k], (trial, k)


def test_one_split_data_sets_score_the_whole_test_sets_once_like_score_directions(sysu):
  _, sysu_source = sysu
  sets = {"visible": sysu_source.test_sets["visible"], "infrared": sysu_source.test_sets["infrared"]}
  directions = (EvalDirection("visible_to_infrared", "visible", "infrared"),
                EvalDirection("infrared_to_visible", "infrared", "visible"))
  source = DataSource("regdb", "regdb", _empty_train_set(VISIBLE), _empty_train_set(INFRARED), sets, directions)
  settings = protocols.settings_for(source, _config(trial=7))
  assert [(s.name, s.shot, s.trials) for s in settings] == [("visible_to_infrared", 0, (7,)),
                                                            ("infrared_to_visible", 0, (7,))]
  embeddings = _embeddings(source, seed=2)
  results = protocols.run_protocols(source, embeddings, settings)
  want = score_directions(source, embeddings)
  for name, r in results.items():
    assert r["trials"] == [7] and r["num_gallery"] == [want[name]["num_gallery"]]
    for k in protocols.METRICS:
      assert r["mean"][k] == want[name][k] and r["std"][k] == 0.0


def test_table_shows_mean_and_std_where_there_are_several_trials():
  row = lambda trials: {"trials": trials, "mean": {k: 50.0 for k in protocols.METRICS},
                        "std": {k: 1.25 for k in protocols.METRICS}}
  table = protocols.format_protocol_table({"all_search_single_shot": row(list(range(10))),
                                           "visible_to_infrared": row([1])})
  lines = table.splitlines()
  assert lines[0] == "| setting | trials | Rank-1 | Rank-5 | Rank-10 | Rank-20 | mAP | mINP |"
  assert lines[2] == "| all_search_single_shot | 10 | " + " | ".join(["50.00 ± 1.25"] * 6) + " |"
  assert lines[3] == "| visible_to_infrared | 1 | " + " | ".join(["50.00"] * 6) + " |"


def test_bad_settings_are_clear_errors(sysu):
  _, source = sysu
  g = source.test_sets["visible"]
  with pytest.raises(ValueError, match="mode 'outdoor'"):
    protocols.sysu_gallery(g.labels, g.cameras, g.paths, mode="outdoor")
  with pytest.raises(ValueError, match="shot 'triple'"):
    protocols.sysu_gallery(g.labels, g.cameras, g.paths, shot="triple")
  setting = protocols.Setting("x", "thermal", "visible", "sysu", None, None, 1, (0,), "f")
  with pytest.raises(KeyError, match="test set 'thermal'"):
    protocols.run_protocols(source, _embeddings(source), [setting])
