"""ImageNet-pretrained ResNet weights in the torchvision layout -> FDNM params and batch_stats.

Users bring torchvision's `resnet50-0676ba61.pth` / `resnet50-11ad3fa6.pth`, timm's
`resnet50.tv_in1k`, or the same tensors as `.safetensors` / `.npz` (the mapping of
names is documented in `fdnm_jax/models/resnet.py`):

  state = load_state_dict(path)                      # name -> np.ndarray
  params, batch_stats = convert(state, source=path)  # strict: one ValueError listing every problem
  variables = merge(variables, params, batch_stats)  # AGP, ANM, BNNeck, classifier keep their init

Both modality stems get `conv1`/`bn1`; the shared stages get `layer1..layerN`
(downsample included); `fc.*` and `*.num_batches_tracked` are dropped. The
converter works for any `stage_sizes` / `width` of the Bottleneck ResNet
(ResNet-50 = (3, 4, 6, 3), 64). `.pth` files need torch; convert them once with
`python -m fdnm_jax.convert --src resnet50.pth --dst resnet50.npz`.
"""

import json
import os
import struct
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np
from flax import traverse_util

from fdnm_jax.errors import CheckpointError, ConfigError, MissingDependencyError, MissingFileError
from fdnm_jax.models.resnet import EXPANSION

STEMS = ("visible_stem", "infrared_stem")
_BN_PARAMS = {"weight": "scale", "bias": "bias"}
_BN_STATS = {"running_mean": "mean", "running_var": "var"}
_IGNORED_SUFFIXES = ("num_batches_tracked",)
_IGNORED_PREFIXES = ("fc.",)

_SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U8": "u1", "BOOL": "?",
}


def _bn_shapes(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
  return {f"{prefix}.{k}": (channels,) for k in ("weight", "bias", "running_mean", "running_var")}


def expected_shapes(stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> dict[str, tuple[int, ...]]:
  """torchvision state-dict names -> PyTorch shapes of a Bottleneck ResNet (without fc, num_batches_tracked)."""
  shapes = {"conv1.weight": (width, 3, 7, 7), **_bn_shapes("bn1", width)}
  in_ch = width
  for s, num_blocks in enumerate(stage_sizes, start=1):
    w = width * 2 ** (s - 1)
    out = w * EXPANSION
    for b in range(num_blocks):
      p = f"layer{s}.{b}"
      shapes[f"{p}.conv1.weight"] = (w, in_ch, 1, 1)
      shapes[f"{p}.conv2.weight"] = (w, w, 3, 3)
      shapes[f"{p}.conv3.weight"] = (out, w, 1, 1)
      for k, c in ((1, w), (2, w), (3, out)):
        shapes.update(_bn_shapes(f"{p}.bn{k}", c))
      # First block of every stage: stride 2 (layers 2..) or channel change (layer1) -> downsample.
      # (A last_stride of 1 changes no shape: layer4's block0 still changes the channels.)
      if b == 0 and (s > 1 or in_ch != out):
        shapes[f"{p}.downsample.0.weight"] = (out, in_ch, 1, 1)
        shapes.update(_bn_shapes(f"{p}.downsample.1", out))
      in_ch = out
  return shapes


def _is_ignored(name: str) -> bool:
  return name.endswith(_IGNORED_SUFFIXES) or name.startswith(_IGNORED_PREFIXES)


def _flax_path(name: str) -> tuple[str, tuple[str, ...]]:
  """torchvision name -> ("params" | "batch_stats", Flax path below the stem/stage module)."""
  parts = name.split(".")
  leaf = parts[-1]
  if parts[0].startswith("layer"):
    module = [parts[0], f"block{parts[1]}"]
    rest = parts[2:-1]
    if rest[0] == "downsample":
      rest = ["downsample_conv" if rest[1] == "0" else "downsample_bn"]
    module += rest
  else:
    module = parts[:-1]  # conv1 | bn1 (stem)
  if leaf in _BN_STATS:
    return "batch_stats", tuple(module) + (_BN_STATS[leaf],)
  if module[-1].startswith("conv") or module[-1] == "downsample_conv":
    return "params", tuple(module) + ("kernel",)
  return "params", tuple(module) + (_BN_PARAMS[leaf],)


def convert(state_dict: Mapping[str, Any], source: str = "<state dict>", stage_sizes: Sequence[int] = (3, 4, 6, 3),
            width: int = 64) -> tuple[dict, dict]:
  """Converts a torchvision-layout state dict (name -> array) into nested (params, batch_stats) float32 trees.

  Raises:
    ValueError: naming `source` and listing every missing, unexpected and shape-mismatched key.
  """
  expected = expected_shapes(stage_sizes, width)
  given = {k: v for k, v in state_dict.items() if not _is_ignored(k)}
  missing = sorted(set(expected) - set(given))
  unexpected = sorted(set(given) - set(expected))
  mismatched = sorted(f"{k}: file {tuple(np.shape(given[k]))}, expected {expected[k]}"
                      for k in set(expected) & set(given) if tuple(np.shape(given[k])) != expected[k])
  if missing or unexpected or mismatched:
    lines = [f"{source}: not a torchvision-layout ResNet with stage_sizes={tuple(stage_sizes)}, width={width}:"]
    for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
      if keys:
        lines.append(f"  {len(keys)} {title}: " + ", ".join(keys))
    raise CheckpointError("\n".join(lines))
  flat = {"params": {}, "batch_stats": {}}
  for name in expected:
    value = np.asarray(given[name], dtype=np.float32)
    if value.ndim == 4:
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    collection, path = _flax_path(name)
    if path[0].startswith("layer"):
      flat[collection][path] = value
    else:
      for stem in STEMS:
        flat[collection][(stem,) + path] = value
  return (traverse_util.unflatten_dict(flat["params"]), traverse_util.unflatten_dict(flat["batch_stats"]))


def merge(variables: Mapping[str, Any], params: Mapping[str, Any], batch_stats: Mapping[str, Any],
          source: str = "<state dict>") -> dict:
  """Returns `variables` with the converted leaves put in; every other leaf keeps its init.

  Works on NumPy or JAX arrays (also inside `jax.jit`).

  Raises:
    ValueError: listing every converted leaf that has no leaf of the same shape in `variables`.
  """
  import jax.numpy as jnp  # local: the CLI converter needs no JAX device.
  out = {}
  problems = []
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    target = traverse_util.flatten_dict(dict(variables.get(collection, {})))
    for path, value in traverse_util.flatten_dict(dict(tree)).items():
      name = "/".join((collection,) + path)
      if path not in target:
        problems.append(f"{name}: not in the model")
      elif tuple(target[path].shape) != tuple(value.shape):
        problems.append(f"{name}: model {tuple(target[path].shape)}, file {tuple(value.shape)}")
      else:
        target[path] = jnp.asarray(value, target[path].dtype)
    out[collection] = traverse_util.unflatten_dict(target)
  if problems:
    raise CheckpointError(f"{source}: {len(problems)} converted weights do not fit the model:\n  "
                          + "\n  ".join(problems))
  for collection, tree in variables.items():
    out.setdefault(collection, tree)
  return out


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
  with open(path, "rb") as f:
    data = f.read()
  if len(data) < 8:
    raise ValueError("shorter than the 8-byte header length")
  (header_len,) = struct.unpack("<Q", data[:8])
  if 8 + header_len > len(data):
    raise ValueError(f"header of {header_len} bytes runs past the end of the file ({len(data)} bytes)")
  header = json.loads(data[8:8 + header_len].decode("utf-8"))
  body = memoryview(data)[8 + header_len:]
  out = {}
  for name, info in header.items():
    if name == "__metadata__":
      continue
    start, end = info["data_offsets"]
    shape = tuple(info["shape"])
    if not 0 <= start <= end <= len(body):
      raise ValueError(f"tensor {name!r} (bytes {start}..{end}) runs past the end of the data ({len(body)} bytes)")
    raw = body[start:end]
    if info["dtype"] == "BF16":
      arr = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
    elif info["dtype"] in _SAFETENSORS_DTYPES:
      arr = np.frombuffer(raw, _SAFETENSORS_DTYPES[info["dtype"]])
    else:
      raise ValueError(f"tensor {name!r}: unsupported dtype {info['dtype']}")
    if arr.size != int(np.prod(shape)):
      raise ValueError(f"tensor {name!r}: {arr.size} values for shape {shape}")
    out[name] = arr.reshape(shape).copy()
  return out


_ZIP_MAGIC = b"PK\x03\x04"  # torch.save's default format (PyTorch >= 1.6) is a zip archive.
_PICKLE_PROTOCOLS = range(2, 6)  # the legacy format starts with a pickle: 0x80 <protocol>.


def _check_torch_magic(path: str) -> None:
  """Raises CheckpointError when `path` is neither a zip archive nor a pickle (a text file, an HTML error page)."""
  with open(path, "rb") as f:
    head = f.read(16)
  if head.startswith(_ZIP_MAGIC) or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS):
    return
  kind = "is empty" if not head else f"starts with {head[:12]!r}" + (
      " (text: a download error page, or a path written into the file?)"
      if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "")
  raise CheckpointError(
      f"pretrained weights {path!r} are not a PyTorch checkpoint: a .pth/.pt file is a zip archive or a pickle, "
      f"this file {kind}. Download torchvision's resnet50-0676ba61.pth again "
      "(https://download.pytorch.org/models/resnet50-0676ba61.pth) or pass a converted .npz.")


def _read_torch(path: str) -> dict[str, np.ndarray]:
  _check_torch_magic(path)
  try:
    import torch  # optional dependency
  except ImportError:
    raise MissingDependencyError(
        f"{path}: reading a .pth/.pt file needs torch, which is not installed; convert it once with "
        f"`python -m fdnm_jax.convert --src {path} --dst weights.npz` on a machine with torch") from None
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle.UnpicklingError (objects other than tensors), a truncated zip, ...
    # torch's message suggests weights_only=False, which would run any code the file holds: never passed on.
    raise CheckpointError(
        f"pretrained weights {path!r} could not be loaded as tensors only (torch.load(weights_only=True) failed: "
        f"{type(e).__name__}). The file is truncated, or holds Python objects besides tensors. Save only the state "
        "dict (torch.save(model.state_dict(), path)) on a machine you trust, or download torchvision's "
        "resnet50-0676ba61.pth again, then convert it with python -m fdnm_jax.convert.") from None
  for key in ("state_dict", "model"):
    if isinstance(obj, Mapping) and isinstance(obj.get(key), Mapping):
      obj = obj[key]
  if not isinstance(obj, Mapping):
    raise CheckpointError(f"pretrained weights {path!r} hold a {type(obj).__name__}, not a state dict (name -> "
                          "tensor).")
  return {k: v.detach().float().numpy() if v.is_floating_point() else v.numpy()
          for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_state_dict(path: str) -> dict[str, np.ndarray]:
  """Reads a state dict (name -> np.ndarray) from `.npz`, `.safetensors` or `.pth`/`.pt` (needs torch).

  Raises:
    FileNotFoundError: no such file.
    ValueError: an unknown extension, or a truncated / corrupt file (the message names the file).
    ImportError: a `.pth`/`.pt` file without torch installed.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"pretrained weights {path!r}: no such file")
  ext = os.path.splitext(path)[1].lower()
  readers = {".npz": lambda p: _read_npz(p), ".safetensors": _read_safetensors, ".pth": _read_torch,
             ".pt": _read_torch, ".bin": _read_torch}
  if ext not in readers:
    raise ConfigError(f"pretrained weights {path!r}: unknown extension {ext!r}; expected .npz, .safetensors, .pth "
                      "or .pt")
  try:
    return readers[ext](path)
  except (ImportError, CheckpointError):
    raise
  except Exception as e:  # zipfile.BadZipFile, EOFError, pickle / JSON errors, ...
    raise CheckpointError(f"pretrained weights {path!r} could not be read (truncated or corrupt?): "
                          f"{type(e).__name__}: {e}") from e


def _read_npz(path: str) -> dict[str, np.ndarray]:
  with np.load(path, allow_pickle=False) as f:
    return {k: f[k] for k in f.files}


def load_converted(path: str, stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> tuple[dict, dict]:
  """`convert(load_state_dict(path))`: host NumPy (params, batch_stats) trees."""
  return convert(load_state_dict(path), source=path, stage_sizes=stage_sizes, width=width)


def weights_path(model_config: Any) -> Optional[str]:
  """The weights file `config.model.pretrained` names, or None for a random init ("" or "none")."""
  value = str(model_config.get("pretrained", "") or "").strip()
  return None if value.lower() in ("", "none") else value


def init_label(model_config: Any) -> str:
  """How a run's backbone was initialised, for reports: "from scratch" or "ImageNet (<file name>)"."""
  path = weights_path(model_config)
  return "from scratch" if path is None else f"ImageNet ({os.path.basename(path)})"


def check_weights(path: str, stage_sizes: Sequence[int] = (3, 4, 6, 3), width: int = 64) -> None:
  """Reads `path` and checks every name and shape against the Bottleneck ResNet (`convert`'s checks) without
  converting: what a fresh run does before it touches its workdir.

  Raises:
    MissingFileError, ConfigError, CheckpointError, MissingDependencyError: as `load_state_dict` and `convert`.
  """
  convert(load_state_dict(path), source=path, stage_sizes=stage_sizes, width=width)
