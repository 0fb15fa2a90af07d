"""A generated visible/infrared person data set, written in RegDB's on-disk layout.

Every identity has a body layout drawn once from the seed: proportions (head size, shoulder width, torso
and leg length), hair, sleeves, trousers/shorts/skirt, a pattern on the upper garment (stripes, checks,
a chest patch, two tones), an optional bag. Both modalities render the same layout:

- visible images colour each region with the identity's RGB colours, with cylinder shading, a cluttered
  background, the camera's colour cast and illumination, a per-image brightness and fine i.i.d. noise;
- infrared images map each region to an intensity: skin hot (drawn per identity), hair, garments, shoes
  and bags a fixed spectral response of their colour unlike luminance (`_nir_intensity`) plus a small
  per-identity offset; weakly shaded, then blurred, with the camera's
  gain/offset, low-frequency noise and per-row sensor banding; stored as one intensity replicated to
  three channels (a 24-bit BMP, R = G = B).

So identity is shared across modalities through shape, pattern layout and one projection of the garment
colours: an infrared image carries no hue, and the two modalities differ in colour, intensity statistics
and spectrum (infrared is smoother). Each image jitters pose (shift, scale, mirror, leg/arm swing).
Calibration: with configs/synthetic.py (300 train identities, a tiny FDNM trained from scratch for ~1,700
steps at 64 x 32) the cross-modal test mAP reaches about 0.6 in both directions; with 48-100 train
identities it stays at 0.1-0.3 (too few identities to generalise to unseen ones), which is why the
default set is wide (many identities) rather than deep (few images each).

On disk (RegDB, FDNM_SPEC.md §5):
  Visible/<pid>/c<cam>_<i:04d>.bmp    pid = 1..num_train_ids+num_test_ids, i = 0..images_per_id-1
  Thermal/<pid>/c<cam>_<i:04d>.bmp
  idx/{train,test}_{visible,thermal}_{1..10}.txt   lines "<relative path> <label>"
  synthetic_manifest.json              the generator parameters (see `generate`)
Image i of an identity comes from visible camera 1 + i % num_cameras, thermal camera
num_cameras + 1 + i % num_cameras (the camera ids of the two modalities are disjoint, as in RegDB where
visible = 1 and thermal = 2); the camera is in the file name because RegDB's lists have no camera field.
Split t (1..10) is its own seeded random partition of all identities into num_train_ids train and
num_test_ids test identities; as in RegDB's lists, the labels of each list file are the identities of
that file relabelled 0..N-1 in ascending pid order (train and test lists both start at 0).
"""

import colorsys
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from typing import Any, Optional

import numpy as np

from fdnm_jax.errors import ConfigError

FORMAT = "fdnm-synthetic-regdb"  # manifest "format" field.
VERSION = 5  # bump when the rendering changes: a stored set with another version is regenerated.
MANIFEST = "synthetic_manifest.json"
NUM_SPLITS = 10
_SS = 2  # supersampling factor of the renderer (anti-aliased edges).

# Region ids of the layout map.
_BACKGROUND, _SKIN, _HAIR, _UPPER, _LOWER, _SHOES, _BAG = range(7)
_NUM_REGIONS = 7

# Per-image random streams are keyed by these tags so that adding a stream never shifts another.
_TAG_IDENTITY, _TAG_CAMERA, _TAG_IMAGE, _TAG_SPLIT = 1, 2, 3, 4

_SKIN_TONES = ((0.96, 0.80, 0.69), (0.90, 0.70, 0.55), (0.78, 0.57, 0.44), (0.55, 0.38, 0.26),
               (0.36, 0.24, 0.16))
_BINOMIAL5 = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0  # blur kernel (no transcendental functions: exact).


# Sets of at least this many images are rendered by one child process per CPU; smaller ones in this process, where
# starting the children would cost more than it saves.
PARALLEL_MIN_IMAGES = 1024


def generate(root: str, *, num_train_ids: int, num_test_ids: int, images_per_id: int, num_cameras: int,
             height: int, width: int, seed: int, workers: Optional[int] = None) -> str:
  """Writes the synthetic data set under `root` (RegDB layout, see the module docstring) if not already there.

  Deterministic: the same arguments give the same files byte for byte. Idempotent: if `root` holds a
  manifest with the same parameters, returns at once. Otherwise the set is written into a fresh
  temporary sibling folder and moved into place, so `root` never holds a half-written set:
  - `root` missing or empty: the new set becomes `root`;
  - `root` holds a manifest with other parameters (a stale generated set): it is replaced;
  - `root` is a non-empty folder without a manifest: FileExistsError (never deletes data it did not write).
  Several processes generating the same parameters into the same root at once are safe (the first to
  finish wins, the others discard their copy).

  Args:
    root: destination folder.
    num_train_ids, num_test_ids: identities per split on each side (every split uses all of them).
    images_per_id: images per identity per modality.
    num_cameras: cameras per modality.
    height, width: image size in pixels.
    seed: generator seed (non-negative).
    workers: processes rendering the images (fresh Python processes, each writes whole identities); None = one
      per CPU this process may use when the set has at least PARALLEL_MIN_IMAGES images, else 1 (this process).
      The files are the same byte for byte whatever the count: each image is a pure function of (seed, pid,
      modality, index).
  Returns:
    The absolute path of `root`.
  """
  params = {"num_train_ids": num_train_ids, "num_test_ids": num_test_ids, "images_per_id": images_per_id,
            "num_cameras": num_cameras, "height": height, "width": width, "seed": seed}
  for name, value in params.items():
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
      raise TypeError(f"synthetic.generate: {name} must be an int, got {value!r}.")
  for name in ("num_train_ids", "num_test_ids", "images_per_id", "num_cameras"):
    if params[name] < 1:
      raise ConfigError(f"synthetic.generate: {name} must be >= 1, got {params[name]}.")
  if height < 16 or width < 8:
    raise ConfigError(f"synthetic.generate: images must be at least 16 x 8 pixels, got {height} x {width}.")
  if seed < 0:
    raise ConfigError(f"synthetic.generate: seed must be >= 0, got {seed}.")
  params = {k: int(v) for k, v in params.items()}
  manifest = {"format": FORMAT, "version": VERSION, **params}

  root = os.path.abspath(os.fspath(root))
  if _read_manifest(root) == manifest:
    return root
  if os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, MANIFEST)):
    raise FileExistsError(
        f"{root} exists, is not empty and has no {MANIFEST}: it is not a generated synthetic set, so it is "
        "left alone. Point config.data.root at a new or empty folder (or delete this one).")
  if os.path.exists(root) and not os.path.isdir(root):
    raise FileExistsError(f"{root} exists and is not a folder: pass a folder path for the synthetic set.")
  parent = os.path.dirname(root)
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.tmp-", dir=parent)
  try:
    _write_dataset(tmp, manifest, workers)
    _install(tmp, root, manifest)
  finally:
    if os.path.exists(tmp):
      shutil.rmtree(tmp, ignore_errors=True)
  return root


def render_image(seed: int, pid: int, modality: int, index: int, num_cameras: int, height: int,
                    width: int) -> np.ndarray:
  """Image `index` of identity `pid` in `modality` (0 visible, 1 infrared), exactly as `generate` writes it.

  Returns:
    uint8 [height, width, 3]; for infrared, R = G = B.
  """
  ident = _identity(seed, pid)
  camera = index % num_cameras
  cam = _camera(seed, modality, camera)
  rng = np.random.default_rng([seed, _TAG_IMAGE, modality, pid, index])
  if modality == 0:
    return _render_visible(ident, cam, rng, height, width)
  return _render_infrared(ident, cam, rng, height, width)


def split_identities(seed: int, num_train_ids: int, num_test_ids: int, trial: int) -> tuple[np.ndarray, np.ndarray]:
  """The train and test pids (1-based, ascending, int64) of split `trial` (1..10)."""
  pids = np.arange(1, num_train_ids + num_test_ids + 1)
  perm = np.random.default_rng([seed, _TAG_SPLIT, trial]).permutation(pids)
  return np.sort(perm[:num_train_ids]), np.sort(perm[num_train_ids:])


def _read_manifest(root: str) -> Optional[dict]:
  path = os.path.join(root, MANIFEST)
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {"unreadable": path}


def _install(tmp: str, root: str, manifest: dict) -> None:
  """Moves the finished set `tmp` to `root` (see `generate` for the rules)."""
  for _ in range(5):
    if os.path.isdir(root) and not os.listdir(root):
      try:
        os.rmdir(root)
      except OSError:
        pass
    if not os.path.exists(root):
      try:
        os.rename(tmp, root)
        return
      except OSError:
        continue  # another process installed its copy first: look at it again.
    if _read_manifest(root) == manifest:
      return
    stale = tempfile.mkdtemp(prefix=f".{os.path.basename(root)}.stale-", dir=os.path.dirname(root))
    try:
      os.rename(root, os.path.join(stale, "old"))
    except OSError:
      shutil.rmtree(stale, ignore_errors=True)
      continue
    try:
      os.rename(tmp, root)
    except OSError:
      shutil.rmtree(stale, ignore_errors=True)
      continue
    shutil.rmtree(stale, ignore_errors=True)
    return
  raise RuntimeError(f"Could not install the synthetic data set at {root}: another process keeps replacing "
                     "it with different parameters. Give each run its own config.data.root.")


_FOLDERS = ("Visible", "Thermal")  # by modality (0 visible, 1 infrared).


def _image_names(manifest: dict, modality: int, pid: int) -> list[str]:
  """Relative paths of identity `pid`'s images in `modality`, in image order."""
  folder = _FOLDERS[modality]
  n_cam = manifest["num_cameras"]
  return [f"{folder}/{pid}/c{1 + i % n_cam + (n_cam if modality == 1 else 0)}_{i:04d}.bmp"
          for i in range(manifest["images_per_id"])]


def _write_identity(out: str, manifest: dict, modality: int, pid: int) -> None:
  """Renders and writes every image of identity `pid` in `modality` under `out` (its folder must exist)."""
  for i, name in enumerate(_image_names(manifest, modality, pid)):
    image = render_image(manifest["seed"], pid, modality, i, manifest["num_cameras"], manifest["height"],
                         manifest["width"])
    with open(os.path.join(out, name), "wb") as f:
      f.write(_bmp_bytes(image))


# A worker: `python -c _WORKER <out> <manifest JSON> <jobs JSON>` writes identities [(modality, pid), ...].
_WORKER = ("import json, sys; from input_pipeline.datasets import synthetic; "
           "[synthetic._write_identity(sys.argv[1], json.loads(sys.argv[2]), m, p) "
           "for m, p in json.loads(sys.argv[3])]")
_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _write_identities_in_processes(out: str, manifest: dict, jobs: list[tuple[int, int]], workers: int) -> None:
  """Writes `jobs` [(modality, pid)] in `workers` fresh Python processes (job i in process i % workers).

  Plain child processes, not multiprocessing: its spawn re-imports the caller's __main__ (main.py: JAX and
  TensorFlow) in every child, and a fork would inherit the caller's JAX/TensorFlow threads.
  """
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join([_REPO_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
  procs = [subprocess.Popen([sys.executable, "-c", _WORKER, out, json.dumps(manifest),
                             json.dumps(jobs[k::workers])],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
           for k in range(workers)]
  errors = [(p.communicate()[1], p.returncode) for p in procs]
  failed = [f"exit status {rc}: {err.strip()[-2000:]}" for err, rc in errors if rc != 0]
  if failed:
    raise RuntimeError(f"synthetic.generate: a rendering process failed writing under {out}: {failed[0]}")


def _default_workers(num_images: int) -> int:
  if num_images < PARALLEL_MIN_IMAGES:
    return 1
  try:
    return max(1, len(os.sched_getaffinity(0)))
  except AttributeError:  # no sched_getaffinity (macOS).
    return max(1, os.cpu_count() or 1)


def _write_dataset(out: str, manifest: dict, workers: Optional[int] = None) -> None:
  num_ids = manifest["num_train_ids"] + manifest["num_test_ids"]
  jobs = [(modality, pid) for modality in (0, 1) for pid in range(1, num_ids + 1)]
  for modality, pid in jobs:
    os.makedirs(os.path.join(out, _FOLDERS[modality], str(pid)))
  if workers is None:
    workers = _default_workers(len(jobs) * manifest["images_per_id"])
  if workers <= 1:
    for modality, pid in jobs:
      _write_identity(out, manifest, modality, pid)
  else:
    _write_identities_in_processes(out, manifest, jobs, workers)
  files = {(modality, pid): _image_names(manifest, modality, pid) for modality, pid in jobs}
  seed = manifest["seed"]
  os.makedirs(os.path.join(out, "idx"))
  for trial in range(1, NUM_SPLITS + 1):
    train, test = split_identities(seed, manifest["num_train_ids"], manifest["num_test_ids"], trial)
    for part, pids in (("train", train), ("test", test)):
      for modality, kind in ((0, "visible"), (1, "thermal")):
        lines = [f"{p} {label}" for label, pid in enumerate(pids) for p in files[(modality, int(pid))]]
        with open(os.path.join(out, "idx", f"{part}_{kind}_{trial}.txt"), "w", encoding="utf-8", newline="\n") as f:
          f.write("\n".join(lines) + "\n")
  with open(os.path.join(out, MANIFEST), "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=2, sort_keys=True)
    f.write("\n")


def _bmp_bytes(image: np.ndarray) -> bytes:
  """An uncompressed 24-bit BMP (bottom-up rows, BGR, rows padded to 4 bytes) of uint8 [H, W, 3]."""
  h, w, _ = image.shape
  row = 3 * w
  pad = (-row) % 4
  data = np.ascontiguousarray(image[::-1, :, ::-1]).reshape(h, row)
  if pad:
    data = np.concatenate([data, np.zeros((h, pad), np.uint8)], axis=1)
  size = (row + pad) * h
  header = struct.pack("<2sIHHI", b"BM", 54 + size, 0, 0, 54)
  info = struct.pack("<IiiHHIIiiII", 40, w, h, 1, 24, 0, size, 2835, 2835, 0, 0)
  return header + info + data.tobytes()


def _rgb(rng: np.random.Generator, sat: tuple[float, float], val: tuple[float, float]) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(*sat), rng.uniform(*val)))


def _identity(seed: int, pid: int) -> dict[str, Any]:
  """The appearance of one identity: body geometry, region colours (RGB) and temperatures."""
  rng = np.random.default_rng([seed, _TAG_IDENTITY, pid])
  g = {}
  g["head_r"] = rng.uniform(0.04, 0.065)
  g["head_cy"] = rng.uniform(0.04, 0.08) + g["head_r"]
  g["torso_top"] = g["head_cy"] + g["head_r"] + 0.012
  g["shoulder"] = rng.uniform(0.07, 0.125)
  g["waist"] = g["shoulder"] * rng.uniform(0.78, 0.95)
  g["torso_bottom"] = g["torso_top"] + rng.uniform(0.24, 0.34)
  g["feet"] = rng.uniform(0.93, 0.965)
  g["arm_w"] = rng.uniform(0.022, 0.034)
  g["arm_len"] = rng.uniform(0.29, 0.34)
  g["short_sleeves"] = rng.uniform() < 0.35
  g["leg_w"] = rng.uniform(0.026, 0.048)
  g["leg_gap"] = rng.uniform(0.028, 0.045)
  g["lower_style"] = rng.integers(0, 4)  # 0 trousers, 1 shorts, 2 skirt, 3 long coat over trousers
  g["hair_level"] = rng.uniform(-0.3, 0.45)  # hair covers the head above head_cy - level * head_r
  g["long_hair"] = rng.uniform(0.0, 0.16) if rng.uniform() < 0.35 else 0.0
  g["upper_pattern"] = rng.integers(0, 6)  # solid, h-stripes, v-stripes, checks, chest patch, two tones
  g["period"] = rng.uniform(0.045, 0.09)
  g["phase"] = rng.uniform(0.0, 1.0)
  g["patch"] = (rng.uniform(-0.04, 0.04), rng.uniform(0.06, 0.16), rng.uniform(0.03, 0.055),
                rng.uniform(0.03, 0.06))  # centre x, centre y below torso_top, half width, half height
  g["two_tone"] = rng.uniform(0.3, 0.7)
  g["lower_pattern"] = rng.integers(0, 3)  # solid, outer side stripe, knee band
  g["bag"] = rng.integers(0, 4)  # 0 none, 1 backpack seen from the side, 2 handbag, 3 shoulder bag
  g["bag_side"] = 1.0 if rng.uniform() < 0.5 else -1.0
  g["bag_size"] = (rng.uniform(0.035, 0.06), rng.uniform(0.1, 0.18))

  colors = np.zeros((_NUM_REGIONS, 2, 3))
  colors[_BACKGROUND] = 0.5
  colors[_SKIN] = np.array(_SKIN_TONES[rng.integers(0, len(_SKIN_TONES))]) * rng.uniform(0.9, 1.05)
  colors[_HAIR] = _rgb(rng, (0.2, 0.7), (0.05, 0.5))
  colors[_UPPER, 0] = _rgb(rng, (0.15, 1.0), (0.15, 0.95))
  colors[_UPPER, 1] = _rgb(rng, (0.0, 1.0), (0.1, 1.0))
  colors[_LOWER, 0] = _rgb(rng, (0.1, 0.9), (0.1, 0.8))
  colors[_LOWER, 1] = _rgb(rng, (0.0, 1.0), (0.2, 1.0))
  colors[_SHOES] = _rgb(rng, (0.0, 0.6), (0.05, 0.6))
  colors[_BAG, 0] = _rgb(rng, (0.1, 1.0), (0.1, 0.9))
  colors[_BAG, 1] = _rgb(rng, (0.0, 1.0), (0.1, 1.0))

  colors = np.clip(colors, 0.0, 1.0)
  temps = np.zeros((_NUM_REGIONS, 2))
  temps[_SKIN] = rng.uniform(0.78, 0.95)
  for region in (_HAIR, _UPPER, _LOWER, _SHOES, _BAG):
    temps[region] = np.clip(_nir_intensity(colors[region]) + rng.uniform(-0.03, 0.03, size=2), 0.02, 0.98)
  return {"geometry": g, "colors": colors, "temps": temps}


def _nir_intensity(rgb: np.ndarray) -> np.ndarray:
  """Infrared intensity of a garment of colour `rgb` [..., 3]: a fixed spectral response unlike luminance.

  Red-rich and dark-blue dyes come out bright, green ones dark (weights 0.6 R, 0.05 G, 0.35 (1 - B)),
  so the infrared image keeps one projection of the colour — not its hue — as real near-infrared does.
  """
  return 0.1 + 0.8 * (0.6 * rgb[..., 0] + 0.05 * rgb[..., 1] + 0.35 * (1.0 - rgb[..., 2]))


def _camera(seed: int, modality: int, camera: int) -> dict[str, Any]:
  """A camera's rendering constants: colour cast and background (visible), gain/offset/blur (infrared)."""
  rng = np.random.default_rng([seed, _TAG_CAMERA, modality, camera])
  return {
      "cast": rng.uniform(0.82, 1.18, size=3),
      "illumination": rng.uniform(0.8, 1.1),
      "wall": _rgb(rng, (0.0, 0.4), (0.3, 0.8)),
      "floor": _rgb(rng, (0.0, 0.3), (0.2, 0.6)),
      "horizon": rng.uniform(0.78, 0.9),
      "gain": rng.uniform(0.8, 1.1),
      "offset": rng.uniform(-0.05, 0.08),
      "background_temp": rng.uniform(0.05, 0.3),
      "noise": rng.uniform(0.004, 0.012),
      "banding": rng.uniform(0.005, 0.02),
  }


def _layout(geometry: dict[str, Any], rng: np.random.Generator, height: int,
            width: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Rasterises one posed body at `_SS` x the output size.

  Returns:
    region int32 [Hs, Ws] (region ids), alt bool [Hs, Ws] (pattern: the region's second colour),
    radial float [Hs, Ws] (|x| / shoulder half-width, for shading); Hs = _SS * height, Ws = _SS * width.
  """
  g = geometry
  hs, ws = _SS * height, _SS * width
  dx = rng.uniform(-0.035, 0.035) * width / height
  dy = rng.uniform(-0.025, 0.025)
  scale = rng.uniform(0.88, 1.06)
  mirror = rng.uniform() < 0.5
  stride = rng.uniform(-0.03, 0.05)  # legs apart at the feet (walking)
  swing = rng.uniform(-0.03, 0.03)  # arms up/down, opposite on the two sides

  yy = (np.arange(hs) + 0.5) / hs
  xx = ((np.arange(ws) + 0.5) / ws - 0.5) * (width / height)
  y = ((yy - 0.5 - dy) / scale + 0.5)[:, None] * np.ones((1, ws))
  x = np.ones((hs, 1)) * ((xx - dx) / scale)[None, :]
  if mirror:
    x = -x
  ax = np.abs(x)
  region = np.zeros((hs, ws), np.int32)
  alt = np.zeros((hs, ws), bool)

  top, bottom, feet = g["torso_top"], g["torso_bottom"], g["feet"]
  leg_len = feet - bottom
  t = np.clip((y - top) / (bottom - top), 0.0, 1.0)
  half = g["shoulder"] + (g["waist"] - g["shoulder"]) * t

  if g["long_hair"] > 0:
    m = (ax < g["head_r"] * 1.1) & (y > g["head_cy"]) & (y < g["head_cy"] + g["head_r"] + g["long_hair"])
    region[m] = _HAIR

  # Legs, each a band whose centre moves outwards with the stride.
  u = np.clip((y - bottom) / leg_len, 0.0, 1.0)
  centre = g["leg_gap"] + stride * u
  legs = (y >= bottom) & (y <= feet) & ((np.abs(x - centre) <= g["leg_w"]) | (np.abs(x + centre) <= g["leg_w"]))
  hips = (y >= bottom) & (y <= bottom + 0.06) & (ax <= g["waist"])
  knee = bottom + 0.5 * leg_len
  region[legs | hips] = _LOWER
  style = g["lower_style"]
  if style == 1:
    region[legs & (y > knee)] = _SKIN
  elif style == 2:
    skirt = (y >= bottom) & (y <= bottom + 0.55 * leg_len) & (ax <= g["waist"] * (1.0 + 0.6 * u))
    region[legs & (y > bottom + 0.55 * leg_len)] = _SKIN
    region[skirt] = _LOWER
  region[legs & (y > feet - 0.035)] = _SHOES
  if g["lower_pattern"] == 1:
    alt |= (region == _LOWER) & (ax > centre + 0.5 * g["leg_w"]) & (y > bottom + 0.06)
  elif g["lower_pattern"] == 2:
    alt |= (region == _LOWER) & (np.abs(y - knee) < 0.03)

  # Torso (a trapezoid), arms beside it, a long coat over the thighs.
  torso = (y >= top) & (y <= bottom) & (ax <= half)
  if style == 3:
    torso |= (y > bottom) & (y <= bottom + 0.45 * leg_len) & (ax <= g["waist"] * 1.08)
  side = np.where(x >= 0, 1.0, -1.0)
  arm_top = top + 0.012 + swing * side
  arm = (ax > half) & (ax <= half + g["arm_w"]) & (y >= arm_top) & (y <= arm_top + g["arm_len"])
  sleeve_end = arm_top + (0.1 if g["short_sleeves"] else g["arm_len"] - 0.035)
  region[torso | (arm & (y <= sleeve_end))] = _UPPER
  region[arm & (y > sleeve_end)] = _SKIN

  yt = y - top
  pattern = g["upper_pattern"]
  if pattern == 1:
    stripes = np.floor(yt / g["period"] + g["phase"]) % 2 == 1
  elif pattern == 2:
    stripes = np.floor((x + 1.0) / (0.75 * g["period"]) + g["phase"]) % 2 == 1
  elif pattern == 3:
    stripes = (np.floor(yt / g["period"]) + np.floor((x + 1.0) / g["period"])) % 2 == 1
  elif pattern == 4:
    px, py, pw, ph = g["patch"]
    stripes = (np.abs(x - px) <= pw) & (np.abs(yt - py) <= ph)
  elif pattern == 5:
    stripes = y > top + g["two_tone"] * (bottom - top)
  else:
    stripes = np.zeros_like(alt)
  alt |= (region == _UPPER) & stripes

  # Head, hair on top.
  head = (x ** 2 + (y - g["head_cy"]) ** 2) <= g["head_r"] ** 2
  neck = (ax <= 0.35 * g["head_r"]) & (y > g["head_cy"]) & (y < top + 0.005)
  region[head | neck] = _SKIN
  region[head & (y < g["head_cy"] - g["hair_level"] * g["head_r"])] = _HAIR

  # Bag: a backpack at the back (seen beside the torso), a handbag at the hand, or a shoulder bag at the hip.
  if g["bag"]:
    bw, bh = g["bag_size"]
    sx = x * g["bag_side"]
    if g["bag"] == 1:
      bag = (sx > half - 0.01) & (sx <= half + bw) & (y >= top + 0.03) & (y <= top + 0.03 + bh)
    elif g["bag"] == 2:
      hand = arm_top + g["arm_len"]
      bag = (sx > half + 0.005) & (sx <= half + 0.005 + 1.6 * bw) & (y >= hand - 0.01) & (y <= hand + 0.6 * bh)
    else:
      bag = (sx > g["waist"] - 0.25 * bw) & (sx <= g["waist"] + 1.2 * bw) & (y >= bottom - 0.08) & (
          y <= bottom - 0.08 + 0.55 * bh)
    region[bag] = _BAG
    alt &= ~bag
    alt |= bag & (y < np.min(np.where(bag, y, np.inf)) + 0.3 * bh)
  radial = np.minimum(ax / (g["shoulder"] + g["arm_w"]), 1.2)
  return region, alt, radial


def _downsample(image: np.ndarray) -> np.ndarray:
  h, w = image.shape[0] // _SS, image.shape[1] // _SS
  return image.reshape(h, _SS, w, _SS, *image.shape[2:]).mean(axis=(1, 3))


def _blur(image: np.ndarray, passes: int) -> np.ndarray:
  """Separable 5-tap binomial blur (edge-replicated), `passes` times, of float [H, W]."""
  for _ in range(passes):
    for axis in (0, 1):
      pad = [(0, 0), (0, 0)]
      pad[axis] = (2, 2)
      p = np.pad(image, pad, mode="edge")
      n = image.shape[axis]
      image = sum(k * np.take(p, np.arange(i, i + n), axis=axis) for i, k in enumerate(_BINOMIAL5))
  return image


def _background_boxes(rng: np.random.Generator, hs: int, ws: int, count: int) -> list[tuple[slice, slice, float]]:
  """Random rectangles (doors, windows, furniture) as (rows, cols, strength in [-1, 1])."""
  boxes = []
  for _ in range(count):
    bh, bw = int(rng.integers(hs // 10, hs // 2)), int(rng.integers(ws // 6, ws // 2 + 1))
    r, c = int(rng.integers(0, hs - bh)), int(rng.integers(-bw // 2, ws - bw // 2))
    boxes.append((slice(r, r + bh), slice(max(c, 0), c + bw), rng.uniform(-1.0, 1.0)))
  return boxes


def _render_visible(ident: dict, cam: dict, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  region, alt, radial = _layout(ident["geometry"], rng, height, width)
  hs, ws = region.shape
  yy = ((np.arange(hs) + 0.5) / hs)[:, None]
  horizon = cam["horizon"] + rng.uniform(-0.03, 0.03)
  bg = np.where((yy > horizon)[..., None], cam["floor"], cam["wall"]) * np.ones((hs, ws, 3))
  bg = bg * (1.0 - 0.25 * np.abs(yy - horizon))[..., None]
  for rows, cols, strength in _background_boxes(rng, hs, ws, int(rng.integers(1, 4))):
    bg[rows, cols] = bg[rows, cols] * (1.0 + 0.35 * strength) + 0.05 * rng.uniform(-1, 1, size=3)
  body = ident["colors"][region, alt.astype(np.int32)]
  shade = (1.0 - 0.35 * radial ** 2) * (1.05 - 0.15 * yy)
  image = np.where((region == _BACKGROUND)[..., None], bg, body * shade[..., None])
  image = _downsample(image)
  gain = cam["illumination"] * rng.uniform(0.75, 1.2) * cam["cast"] * rng.uniform(0.95, 1.05, size=3)
  image = image * gain + rng.normal(0.0, rng.uniform(0.01, 0.03), size=image.shape)
  return np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)


def _render_infrared(ident: dict, cam: dict, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
  region, alt, radial = _layout(ident["geometry"], rng, height, width)
  hs, ws = region.shape
  yy = ((np.arange(hs) + 0.5) / hs)[:, None]
  bg = cam["background_temp"] + 0.08 * (yy - 0.5) + np.zeros((hs, ws))
  for rows, cols, strength in _background_boxes(rng, hs, ws, int(rng.integers(0, 3))):
    bg[rows, cols] += 0.12 * strength
  body = ident["temps"][region, alt.astype(np.int32)] * (1.0 - 0.1 * radial ** 2)
  image = _downsample(np.where(region == _BACKGROUND, bg, body))
  image = _blur(image, 1)
  coarse = rng.normal(0.0, 0.03, size=(height // 8 + 1, width // 8 + 1))
  low = _blur(np.repeat(np.repeat(coarse, 8, axis=0), 8, axis=1)[:height, :width], 2)
  rows = rng.normal(0.0, cam["banding"], size=(height, 1))
  image = (image * cam["gain"] * rng.uniform(0.9, 1.1) + cam["offset"] + rng.uniform(-0.04, 0.04) + low + rows
           + rng.normal(0.0, cam["noise"], size=image.shape))
  value = np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8)
  return np.repeat(value[..., None], 3, axis=2)
