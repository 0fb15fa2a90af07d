"""The evaluation protocols of FDNM_SPEC.md §4 as data: which queries, which gallery per trial, how many trials.

A protocol *setting* (e.g. SYSU-MM01 indoor-search single-shot) names a query test set and a gallery test set of a
`DataSource`, the cameras each keeps, and how a trial draws its gallery. `run_protocols` scores every setting and
trial from test-set embeddings computed once: a trial only picks gallery columns of one query x gallery-set distance
matrix, so each image is embedded once whatever the number of trials.

A data-set reader only has to give `ImageSet`s with person ids, cameras and paths:
  - sysu: test_sets "visible" (RGB, cams 1, 2, 4, 5) and "infrared" (IR, cams 3, 6), directions
    (infrared -> visible); the gallery is sampled from "visible".
  - llcm: test_sets "visible" (test_vis, cams 1..9) and "infrared" (test_nir, cams 1, 2, 4..9), both directions;
    the gallery is sampled from the gallery direction's set.
  - regdb / synthetic: one split per run (config.data.trial), both directions, nothing sampled.

Gallery sampling, as the reference code does it (checked against mangye16/Cross-Modal-Re-ID-baseline
`data_manager.py` and ZYK100/LLCM `DEEN/data_manager.py`, `DEEN/test.py`):
  - `process_gallery_sysu(mode, trial)`: `random.seed(trial)`; identities ascending (as "%04d" strings, the same order
    as integers below 10,000), cameras (1, 2, 4, 5) all-search or (1, 2) indoor-search, the files of one
    (identity, camera) sorted by path, one `random.choice` per (identity, camera) that has images.
  - `process_query_sysu`: all IR test images of cams 3 and 6, in both modes (indoor-search keeps cam-6 queries).
  - `process_gallery_llcm(mode, trial)`: the same with the cameras of the gallery modality, ascending.
  - test.py: `for trial in range(10)`, so the seeds are 0..9; the query set is fixed; the reported number is the
    mean over the 10 trials (we add the standard deviation, NumPy's population std).
  - Multi-shot: neither AGW nor DEEN has it. Forks add `np.random.choice(files, 10, replace=False)`, which draws
    from NumPy's global generator (not re-seeded per trial, so a trial number does not determine the gallery) and
    fails below 10 files. Here it is `random.sample(files, min(10, len(files)))` from the same `random.seed(trial)`
    stream as single-shot, in the draw order: a documented choice, not a reproduction.
  - LLCM visible -> infrared: DEEN's test.py (test_mode [2, 1]) samples the NIR images and then swaps the roles
    (the sampled NIR images become the queries, every visible image the gallery). We follow FDNM_SPEC.md §4
    instead: queries = every test image of the query modality, gallery = sampled from the other modality, in both
    directions. Infrared -> visible (DEEN's test_mode [1, 2]) is the same in both.
"""

import dataclasses
import random
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax.numpy as jnp
import ml_collections
import numpy as np

from fdnm_jax.errors import ConfigError, DataError, MissingFileError
from fdnm_jax.evaluation import face
from fdnm_jax.evaluation.metrics import compute_metrics, euclidean_distance, pairwise_distance
from fdnm_jax.evaluation.reranking import re_ranking
from input_pipeline.datasets import sysu
from input_pipeline.datasets.image_set import ImageSet
from input_pipeline.sources import DataSource, EvalDirection

NUM_TRIALS = 10  # AGW / DEEN test.py: `for trial in range(10)`.
TRIALS = tuple(range(NUM_TRIALS))  # gallery seeds 0..9.
SYSU_QUERY_CAMERAS = (3, 6)  # IR cameras; the queries of both all- and indoor-search.
SYSU_GALLERY_CAMERAS = {"all": (1, 2, 4, 5), "indoor": (1, 2)}  # RGB cameras of each search mode.
SHOTS = {"single": 1, "multi": 10}  # gallery images drawn per (identity, camera).
METRICS = ("rank1", "rank5", "rank10", "rank20", "mAP", "mINP")  # reported numbers, percent.

_SYSU_FAMILY = ("AGW process_gallery_sysu: python random.seed(trial), trial in 0..9; ids ascending, cams {cams}, "
                "files sorted by path; {draw} per (id, cam)")
_SYSU_OFFICIAL_FAMILY = ("official SYSU-MM01 permutations exp/rand_perm_cam.mat (MPANet / SAAI get_gallery_names): "
                         "trial t = row t, the first {n} image numbers per (id, cam), cams {cams}")
_LLCM_FAMILY = ("DEEN process_gallery_llcm: python random.seed(trial), trial in 0..9; ids ascending, cams "
                "ascending, files sorted by path; random.choice per (id, cam)")
_SPLIT_FAMILY = "none: the whole test sets of split {split} (one trial)"


@dataclasses.dataclass(frozen=True)
class Setting:
  """One protocol setting: queries from `query`, a gallery drawn from `gallery` (keys of DataSource.test_sets).

  Attributes:
    name: the setting's name in reports, e.g. "all_search_single_shot" or "visible_to_infrared".
    query, gallery: test-set names.
    protocol: the compute_metrics protocol (sysu | regdb | llcm).
    query_cameras: cameras whose images are queries; None = every image of the query set.
    gallery_cameras: cameras the gallery is drawn from, in the drawing order; None = every camera, ascending.
    shot: images drawn per (identity, camera) in each trial; 0 = the whole gallery set, nothing drawn.
    trials: the seeds of the trials (shot > 0), or the one split number (shot 0).
    family: how the gallery is drawn, in words (recorded in every report).
    rand_perm: SYSU-MM01's official permutations (`sysu.read_rand_perm`) when the gallery follows them, else None.
  """
  name: str
  query: str
  gallery: str
  protocol: str
  query_cameras: Optional[tuple[int, ...]]
  gallery_cameras: Optional[tuple[int, ...]]
  shot: int
  trials: tuple[int, ...]
  family: str
  rand_perm: Any = dataclasses.field(default=None, compare=False, repr=False)


class Rerank(NamedTuple):
  """k-reciprocal re-ranking parameters (`fdnm_jax.evaluation.re_ranking`)."""
  k1: int
  k2: int
  lambda_value: float


def _per_camera_groups(pids: np.ndarray, cams: np.ndarray, paths: Sequence[str],
                       cameras: Optional[Sequence[int]]) -> list[list[int]]:
  """Indices of each (identity, camera) group: identities ascending, cameras in `cameras` order (None: ascending),
  each group's indices sorted by path. Images of other cameras are left out."""
  cameras = sorted(set(int(c) for c in cams)) if cameras is None else [int(c) for c in cameras]
  camera_rank = {c: r for r, c in enumerate(cameras)}
  groups: dict[tuple[int, int], list[int]] = {}
  for i, (pid, cam) in enumerate(zip(pids.tolist(), cams.tolist())):
    if cam in camera_rank:
      groups.setdefault((pid, camera_rank[cam]), []).append(i)
  return [sorted(groups[key], key=lambda i: paths[i]) for key in sorted(groups)]


def sample_per_camera(pids: Any, cams: Any, paths: Sequence[str], cameras: Optional[Sequence[int]], shot: int,
                      trial: int) -> np.ndarray:
  """The gallery of one trial: `shot` images drawn per (identity, camera), AGW's procedure.

  `random.Random(trial)` (the same stream as AGW's `random.seed(trial)`) walks the (identity, camera) groups of
  `_per_camera_groups`; a group gives `rng.choice(files)` (shot 1) or `rng.sample(files, min(shot, len(files)))`.

  Args:
    pids, cams: int [N] person ids and cameras of the gallery test set; paths: its N file paths.
    cameras: the cameras drawn from, in order; None = every camera present, ascending.
    shot: images per (identity, camera), >= 1.
    trial: the seed.
  Returns:
    int64 [G] indices into the test set, in draw order.
  """
  if shot < 1:
    raise ValueError(f"shot={shot}: draw at least one image per (identity, camera)")
  pids, cams = np.asarray(pids).reshape(-1), np.asarray(cams).reshape(-1)
  if not len(pids) == len(cams) == len(paths):
    raise ValueError(f"need one camera and one path per pid: got {len(pids)} pids, {len(cams)} cameras, "
                     f"{len(paths)} paths")
  rng = random.Random(trial)
  picked: list[int] = []
  for files in _per_camera_groups(pids, cams, paths, cameras):
    if shot == 1:
      picked.append(rng.choice(files))
    else:
      picked.extend(rng.sample(files, min(shot, len(files))))
  return np.asarray(picked, np.int64)


def sysu_gallery(pids: Any, cams: Any, paths: Sequence[str], mode: str = "all", shot: str = "single",
                 trial: int = 0) -> np.ndarray:
  """SYSU-MM01 gallery of one trial (AGW's `process_gallery_sysu`; multi-shot: see the module docstring).

  Args:
    pids, cams, paths: [N] of the RGB test images.
    mode: "all" (cams 1, 2, 4, 5) or "indoor" (cams 1, 2).
    shot: "single" (1 per identity per camera) or "multi" (10, or all of fewer).
    trial: the seed (AGW: 0..9).
  Returns:
    int64 [G] indices into the RGB test images.
  """
  if mode not in SYSU_GALLERY_CAMERAS:
    raise ValueError(f"SYSU-MM01 mode {mode!r}: use one of {tuple(SYSU_GALLERY_CAMERAS)}")
  if shot not in SHOTS:
    raise ValueError(f"SYSU-MM01 shot {shot!r}: use one of {tuple(SHOTS)}")
  return sample_per_camera(pids, cams, paths, SYSU_GALLERY_CAMERAS[mode], SHOTS[shot], trial)


def sysu_query(cams: Any) -> np.ndarray:
  """int64 [Q] indices of the SYSU-MM01 queries among the IR test images: cams 3 and 6 (both search modes)."""
  return camera_indices(cams, SYSU_QUERY_CAMERAS)


def llcm_gallery(pids: Any, cams: Any, paths: Sequence[str], trial: int = 0) -> np.ndarray:
  """LLCM gallery of one trial (DEEN's `process_gallery_llcm`): one image per identity per camera, cams ascending."""
  return sample_per_camera(pids, cams, paths, None, 1, trial)


def camera_indices(cams: Any, cameras: Optional[Sequence[int]]) -> np.ndarray:
  """int64 indices of the images whose camera is in `cameras` (None: every image), in set order."""
  cams = np.asarray(cams).reshape(-1)
  if cameras is None:
    return np.arange(len(cams), dtype=np.int64)
  return np.flatnonzero(np.isin(cams, np.asarray(cameras))).astype(np.int64)


def query_indices(setting: Setting, image_set: ImageSet) -> np.ndarray:
  """int64 [Q] indices of the setting's queries in its query set (the same in every trial)."""
  return camera_indices(image_set.cameras, setting.query_cameras)


def gallery_indices(setting: Setting, image_set: ImageSet, trial: int) -> np.ndarray:
  """int64 [G] indices of the setting's gallery for `trial` in its gallery set."""
  if setting.shot == 0:
    return camera_indices(image_set.cameras, setting.gallery_cameras)
  if setting.rand_perm is not None:
    return sysu.official_gallery(image_set.labels, image_set.cameras, image_set.paths, setting.rand_perm,
                                 setting.gallery_cameras, setting.shot, trial)
  return sample_per_camera(image_set.labels, image_set.cameras, image_set.paths, setting.gallery_cameras,
                           setting.shot, trial)


def sysu_settings(direction: EvalDirection, trials: Sequence[int] = TRIALS,
                  rand_perm: Optional[Mapping[str, Any]] = None) -> tuple[Setting, ...]:
  """All- and indoor-search, single- and multi-shot, for SYSU-MM01's (infrared -> visible) direction.

  rand_perm: None = the seeded family (AGW); else the official permutations (`sysu.read_rand_perm`), trial t = row t.
  """
  settings = []
  for mode, cams in SYSU_GALLERY_CAMERAS.items():
    for shot, n in SHOTS.items():
      draw = "random.choice" if n == 1 else f"random.sample(files, min({n}, len(files)))"
      family = (_SYSU_FAMILY.format(cams=cams, draw=draw) if rand_perm is None
                else _SYSU_OFFICIAL_FAMILY.format(cams=cams, n=n))
      settings.append(Setting(
          name=f"{mode}_search_{shot}_shot", query=direction.query, gallery=direction.gallery, protocol="sysu",
          query_cameras=SYSU_QUERY_CAMERAS, gallery_cameras=cams, shot=n, trials=tuple(trials),
          family=family, rand_perm=rand_perm))
  return tuple(settings)


def llcm_setting(direction: EvalDirection, trials: Sequence[int] = TRIALS) -> Setting:
  """One LLCM direction: every query-set image against one gallery image per identity per camera."""
  return Setting(name=direction.name, query=direction.query, gallery=direction.gallery, protocol="llcm",
                 query_cameras=None, gallery_cameras=None, shot=1, trials=tuple(trials), family=_LLCM_FAMILY)


def split_setting(direction: EvalDirection, protocol: str, split: int) -> Setting:
  """One direction of a one-split data set (RegDB, synthetic): whole test sets, one trial labelled `split`."""
  return Setting(name=direction.name, query=direction.query, gallery=direction.gallery, protocol=protocol,
                 query_cameras=None, gallery_cameras=None, shot=0, trials=(int(split),),
                 family=_SPLIT_FAMILY.format(split=split))


def settings_for(source: DataSource, config: ml_collections.ConfigDict) -> tuple[Setting, ...]:
  """Every protocol setting of `source`, from its protocol and directions (FDNM_SPEC.md §4).

  sysu: 4 settings per direction (all/indoor x single/multi-shot), 10 trials; llcm: one per direction, 10 trials;
  regdb: one per direction, one trial (the split config.data.trial).
  """
  if source.protocol == "sysu":
    sampling = (config.get("evals") or {}).get("sysu_gallery_sampling", "seeded")
    if sampling not in ("seeded", "official"):
      raise ConfigError(f"config.evals.sysu_gallery_sampling={sampling!r}: use 'seeded' or 'official'.")
    rand_perm = None
    if sampling == "official":
      rand_perm = source.extras.get("rand_perm_cam")
      if rand_perm is None:
        raise MissingFileError(
            "config.evals.sysu_gallery_sampling='official' needs SYSU-MM01's exp/rand_perm_cam.mat: copy "
            "evaluation/data_split/rand_perm_cam.mat of https://github.com/wuancong/SYSU-MM01 into <root>/exp/ (and "
            "prepare the set again if you use config.data.data_dir), or set it to 'seeded'.")
    return tuple(s for d in source.directions for s in sysu_settings(d, rand_perm=rand_perm))
  if source.protocol == "llcm":
    return tuple(llcm_setting(d) for d in source.directions)
  if source.protocol == "regdb":
    return tuple(split_setting(d, "regdb", config.data.trial) for d in source.directions)
  if source.protocol == "face":  # trials = the folds scored (fdnm_jax.evaluation.face).
    return tuple(Setting(name=d.name, query=d.query, gallery=d.gallery, protocol="face", query_cameras=None,
                         gallery_cameras=None, shot=0, trials=face.folds_of(config), family=face.FAMILY)
                 for d in source.directions)
  raise ValueError(f"data source {source.name!r} has protocol {source.protocol!r}: use sysu, regdb, llcm or face")


def _euclidean(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
  """float32 [Q, G] Euclidean distances of the embeddings as scored (re-ranking's input), on the host."""
  return np.asarray(euclidean_distance(jnp.asarray(query_emb), jnp.asarray(gallery_emb)))


def _distances(query_emb: np.ndarray, gallery_emb: np.ndarray) -> np.ndarray:
  """float32 [Q, G] retrieval distances (`pairwise_distance`: minus the dot product), on the host."""
  return np.asarray(pairwise_distance(jnp.asarray(query_emb), jnp.asarray(gallery_emb)))


def _score(dist: np.ndarray, q: ImageSet, q_idx: np.ndarray, g: ImageSet, g_idx: np.ndarray, protocol: str,
           max_rank: int, query_chunk: int) -> dict[str, Any]:
  """One trial's numbers: Rank-k, mAP, mINP in percent, the CMC (fractions) and the set sizes."""
  m = compute_metrics(dist, q.labels[q_idx], g.labels[g_idx], q.cameras[q_idx], g.cameras[g_idx], protocol,
                      max_rank=max_rank, query_chunk=query_chunk)
  cmc = np.asarray(m["cmc"], np.float64)
  row = {f"rank{k}": 100.0 * float(cmc[k - 1]) for k in (1, 5, 10, 20) if k <= max_rank}
  row.update({"mAP": 100.0 * float(m["mAP"]), "mINP": 100.0 * float(m["mINP"]), "cmc": cmc.tolist(),
              "num_query": int(len(q_idx)), "num_gallery": int(len(g_idx))})
  return row


def run_setting(source: DataSource, embeddings_by_set: Mapping[str, np.ndarray], setting: Setting,
                max_rank: int = 20, query_chunk: int = 1024, rerank: Optional[Rerank] = None) -> dict[str, Any]:
  """Scores every trial of one setting; see `run_protocols` for the result (face settings: `face.run_face_setting`)."""
  if setting.protocol == "face":
    return face.run_face_setting(source, embeddings_by_set, setting, max_rank, rerank)
  for name in (setting.query, setting.gallery):
    if name not in source.test_sets or name not in embeddings_by_set:
      raise KeyError(f"setting {setting.name!r} needs test set {name!r}: the data source has "
                     f"{sorted(source.test_sets)}, the embeddings {sorted(embeddings_by_set)}")
  q, g = source.test_sets[setting.query], source.test_sets[setting.gallery]
  q_emb, g_emb = np.asarray(embeddings_by_set[setting.query]), np.asarray(embeddings_by_set[setting.gallery])
  q_idx = query_indices(setting, q)
  if len(q_idx) == 0:
    raise DataError(f"setting {setting.name!r}: no image of test set {setting.query!r} is on the query cameras "
                    f"{setting.query_cameras} (its cameras: {sorted(set(q.cameras.tolist()))})")
  dist = _distances(q_emb[q_idx], g_emb)
  q_q = _euclidean(q_emb[q_idx], q_emb[q_idx]) if rerank is not None else None
  per_trial = []
  for trial in setting.trials:
    g_idx = gallery_indices(setting, g, trial)
    trial_dist = dist[:, g_idx]
    if rerank is not None:
      g_g = _euclidean(g_emb[g_idx], g_emb[g_idx])
      trial_dist = re_ranking(_euclidean(q_emb[q_idx], g_emb[g_idx]), q_q, g_g, rerank.k1, rerank.k2,
                              rerank.lambda_value).astype(np.float32)
    per_trial.append({"trial": int(trial), **_score(trial_dist, q, q_idx, g, g_idx, setting.protocol, max_rank,
                                                    query_chunk)})
  metrics = [k for k in METRICS if k in per_trial[0]]
  values = {k: np.asarray([t[k] for t in per_trial], np.float64) for k in metrics}
  return {
      "query": setting.query, "gallery": setting.gallery, "protocol": setting.protocol, "shot": setting.shot,
      "query_cameras": setting.query_cameras, "gallery_cameras": setting.gallery_cameras,
      "gallery_sampling": setting.family, "trials": [int(t) for t in setting.trials],
      "num_query": int(len(q_idx)), "num_gallery": [t["num_gallery"] for t in per_trial],
      "mean": {k: float(np.mean(v)) for k, v in values.items()},
      "std": {k: float(np.std(v)) for k, v in values.items()},
      "cmc_mean": np.mean([t["cmc"] for t in per_trial], axis=0).tolist(),
      "per_trial": per_trial,
  }


def run_protocols(source: DataSource, embeddings_by_set: Mapping[str, np.ndarray], settings: Sequence[Setting],
                  max_rank: int = 20, query_chunk: int = 1024,
                  rerank: Optional[Rerank] = None) -> dict[str, dict[str, Any]]:
  """Scores every setting and trial from test-set embeddings computed once.

  Per setting, the distances of its queries to its whole gallery set are computed once; a trial picks the columns
  of its gallery (with `rerank`, the k-reciprocal re-ranking is recomputed per trial on that gallery, from the
  Euclidean distances of the embeddings).

  Args:
    source: the data source (test sets: person ids, cameras, paths).
    embeddings_by_set: test-set name -> float32 [N, E] embeddings, rows in the test set's order.
    settings: e.g. `settings_for(source, config)`.
    max_rank: length of the CMC curve; query_chunk: queries ranked per device call (compute_metrics).
    rerank: re-ranking parameters, or None for plain distances.
  Returns:
    setting name -> {"mean", "std": {"rank1", "rank5", "rank10", "rank20", "mAP", "mINP"} in percent over the
    trials (std: NumPy's population std, 0 for one trial); "per_trial": [{"trial", the same numbers, "cmc"
    (fractions), "num_query", "num_gallery"}]; "cmc_mean"; "trials"; "num_query"; "num_gallery" (per trial);
    "gallery_sampling" (the family, in words); "query", "gallery", "protocol", "shot", the cameras}.
  Raises:
    KeyError: a setting names a test set the source or the embeddings lack.
    ValueError: duplicate setting names, a setting without queries, or no query with a true match.
  """
  names = [s.name for s in settings]
  if len(set(names)) != len(names):
    raise ValueError(f"setting names must be unique: {names}")
  return {s.name: run_setting(source, embeddings_by_set, s, max_rank, query_chunk, rerank) for s in settings}


def _cell(result: Mapping[str, Any], metric: str) -> str:
  mean = result["mean"][metric]
  if len(result["trials"]) > 1:
    return f"{mean:.2f} ± {result['std'][metric]:.2f}"
  return f"{mean:.2f}"


def format_protocol_table(results: Mapping[str, Mapping[str, Any]]) -> str:
  """A Markdown table: one row per setting; Rank-1/5/10/20, mAP, mINP in percent, "mean ± std" over trials."""
  cols = [c for c in METRICS + face.METRICS[1:] if any(c in r["mean"] for r in results.values())]
  header = "| setting | trials | " + " | ".join(face.LABELS.get(c, c.replace("rank", "Rank-")) for c in cols) + " |"
  lines = [header, "|" + "---|" * (len(cols) + 2)]
  for name, r in results.items():
    lines.append(f"| {name} | {len(r['trials'])} | " + " | ".join(_cell(r, c) for c in cols) + " |")
  return "\n".join(lines)
