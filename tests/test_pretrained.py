"""Pretrained torchvision-layout ResNet weights (issue 8): parity with PyTorch, strict errors, the config path."""

import json
import struct
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from fdnm_jax import pretrained, sharding, train
from fdnm_jax.errors import CheckpointError
from fdnm_jax.models import resnet
from tests.configs import tiny

try:
  import torch  # dev dependency (requirements-dev.txt); the tests that need it are skipped without it
  nn = torch.nn
except ImportError:
  torch = None
needs_torch = pytest.mark.skipif(torch is None, reason="torch is not installed")


# --- a torchvision-identical ResNet (torchvision from PyPI does not work with this torch) -------------------------

if torch is not None:

  class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.relu = nn.ReLU(inplace=True)
      self.downsample = downsample

    def forward(self, x):
      identity = x if self.downsample is None else self.downsample(x)
      out = self.relu(self.bn1(self.conv1(x)))
      out = self.relu(self.bn2(self.conv2(out)))
      return self.relu(self.bn3(self.conv3(out)) + identity)


  class TorchResNet(nn.Module):
    """torchvision.models.resnet.ResNet(Bottleneck, layers), fc included; last stride set after construction."""

    def __init__(self, layers=(3, 4, 6, 3), width=64, num_classes=1000):
      super().__init__()
      self.inplanes = width
      self.conv1 = nn.Conv2d(3, width, 7, stride=2, padding=3, bias=False)
      self.bn1 = nn.BatchNorm2d(width)
      self.relu = nn.ReLU(inplace=True)
      self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
      for i, n in enumerate(layers):
        setattr(self, f"layer{i + 1}", self._make_layer(width * 2 ** i, n, stride=1 if i == 0 else 2))
      self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
      self.fc = nn.Linear(self.inplanes, num_classes)
      self.num_stages = len(layers)

    def _make_layer(self, planes, blocks, stride):
      downsample = None
      if stride != 1 or self.inplanes != planes * 4:
        downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * 4, 1, stride=stride, bias=False),
                                   nn.BatchNorm2d(planes * 4))
      layers = [Bottleneck(self.inplanes, planes, stride, downsample)]
      self.inplanes = planes * 4
      layers += [Bottleneck(self.inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*layers)

    def forward(self, x):
      x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
      maps = {}
      for i in range(1, self.num_stages + 1):
        x = getattr(self, f"layer{i}")(x)
        maps[f"layer{i}"] = x
      maps["pooled"] = torch.flatten(self.avgpool(x), 1)
      return maps


  def torch_resnet(layers, width, seed):
    """Random weights AND random running stats (BN in eval mode matters), last stride 1."""
    torch.manual_seed(seed)
    model = TorchResNet(layers, width)
    last = getattr(model, f"layer{len(layers)}")[0]
    last.conv2.stride = (1, 1)
    last.downsample[0].stride = (1, 1)
    with torch.no_grad():
      for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
          m.weight.uniform_(0.5, 1.5)
          m.bias.normal_(0.0, 0.1)
          m.running_mean.normal_(0.0, 0.1)
          m.running_var.uniform_(0.5, 2.0)
        elif isinstance(m, nn.Conv2d):
          fan_in = m.weight[0].numel()
          m.weight.normal_(0.0, (1.0 / fan_in) ** 0.5)  # keeps activations O(1) through 16 blocks
    return model.eval()


def numpy_state(model):
  return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def random_state(stage_sizes, width, seed=0):
  rng = np.random.default_rng(seed)
  state = {k: rng.normal(size=s).astype(np.float32) for k, s in pretrained.expected_shapes(stage_sizes, width).items()}
  for k in state:
    if k.endswith("running_var"):
      state[k] = np.abs(state[k]) + 0.5
  return state


# --- parity ----------------------------------------------------------------------------------------------------

def _rel(a, b):
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@needs_torch
def test_resnet50_matches_torchvision_layout_torch_in_eval_mode():
  model = torch_resnet((3, 4, 6, 3), 64, seed=0)
  params, batch_stats = pretrained.convert(numpy_state(model), source="torch resnet50")
  flax_model = resnet.ResNet50(last_stride=1)
  rng = np.random.default_rng(1)
  visible = rng.normal(size=(2, 64, 32, 3)).astype(np.float32)
  infrared = rng.normal(size=(2, 64, 32, 3)).astype(np.float32)
  init = jax.eval_shape(lambda: flax_model.init(jax.random.key(0), visible[:1], infrared[:1]))
  variables = pretrained.merge(jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), init), params, batch_stats)
  # Every leaf of the backbone comes from the file (ResNet has no module torchvision lacks).
  for col in ("params", "batch_stats"):
    flat = traverse_util.flatten_dict(variables[col])
    assert set(flat) == set(traverse_util.flatten_dict(params if col == "params" else batch_stats))
  maps = jax.jit(lambda v, x, y: flax_model.apply(v, x, y, train=False))(variables, visible, infrared)
  worst = {}
  with torch.no_grad():
    for rows, images in ((slice(0, 2), visible), (slice(2, 4), infrared)):
      ref = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
      for name in ("layer1", "layer2", "layer3", "layer4"):
        got = np.asarray(maps[name][rows]).transpose(0, 3, 1, 2)
        worst[name] = max(worst.get(name, 0.0), _rel(got, ref[name].numpy()))
      pooled = np.asarray(maps["layer4"][rows]).mean(axis=(1, 2))
      worst["pooled"] = max(worst.get("pooled", 0.0), _rel(pooled, ref["pooled"].numpy()))
  print("max relative difference:", worst)
  assert maps["layer4"].shape == (4, 4, 2, 2048)  # last stride 1: 64x32 -> 4x2
  # Two float32 implementations (XLA, PyTorch), each with its own summation order. A K-term float32 sum is off by at
  # most lambda * sqrt(K) * u of its terms' scale with probability near 1 (Higham & Mary's probabilistic bound,
  # lambda ~ 3, u = 2^-24): K <= 4,608 (3 x 3 x 512) gives 1.2e-5 per conv; the deepest path's 53 convs, their
  # errors adding in quadrature through BN (eval mode: an affine map of scale ~1) and the residual sums, give 8.8e-5
  # of a map's scale per implementation, and two of them differ by ~1e-4 at most. (A worst-case bound, K * u per
  # conv, is 2.7e-4 for one conv alone: not attainable with rounding errors of both signs.)
  assert all(v <= 1e-4 for v in worst.values()), worst


# --- strict errors ---------------------------------------------------------------------------------------------

def resnet18_state():
  """BasicBlock ResNet-18 names and shapes (torchvision), random values."""
  shapes = {"conv1.weight": (64, 3, 7, 7), "fc.weight": (1000, 512), "fc.bias": (1000,)}
  bn = lambda p, c: {f"{p}.{k}": (c,) for k in ("weight", "bias", "running_mean", "running_var")}
  shapes.update(bn("bn1", 64))
  inp = 64
  for s in range(1, 5):
    c = 64 * 2 ** (s - 1)
    for b in range(2):
      p = f"layer{s}.{b}"
      shapes[f"{p}.conv1.weight"] = (c, inp, 3, 3)
      shapes[f"{p}.conv2.weight"] = (c, c, 3, 3)
      shapes.update(bn(f"{p}.bn1", c))
      shapes.update(bn(f"{p}.bn2", c))
      if b == 0 and s > 1:
        shapes[f"{p}.downsample.0.weight"] = (c, inp, 1, 1)
        shapes.update(bn(f"{p}.downsample.1", c))
      inp = c
  return {k: np.zeros(v, np.float32) for k, v in shapes.items()}


def test_resnet18_state_dict_is_one_error_listing_missing_unexpected_and_mismatched(tmp_path):
  path = tmp_path / "resnet18.npz"
  # Every ResNet-18 name is also a ResNet-50 name: add a head that is not, so all three kinds appear.
  np.savez(path, **resnet18_state(), **{"classifier.weight": np.zeros((10, 512), np.float32)})
  with pytest.raises(ValueError) as e:
    pretrained.load_converted(str(path))
  msg = str(e.value)
  assert str(path) in msg
  assert "missing: " in msg and "layer1.0.conv3.weight" in msg and "layer3.5.bn1.weight" in msg
  assert "1 unexpected: classifier.weight" in msg  # fc.* is dropped, not unexpected
  assert "shape mismatch: " in msg and "layer1.0.conv2.weight" not in msg.split("shape mismatch")[1]
  assert "layer2.0.conv1.weight: file (128, 64, 3, 3), expected (128, 256, 1, 1)" in msg


def test_extra_head_is_listed_as_unexpected_and_fc_is_dropped():
  state = random_state((1, 1, 1, 1), 8)
  state["fc.weight"] = np.zeros((10, 256), np.float32)
  state["bn1.num_batches_tracked"] = np.array(3)
  pretrained.convert(state, stage_sizes=(1, 1, 1, 1), width=8)  # fc and num_batches_tracked are ignored
  state["classifier.weight"] = np.zeros((10, 256), np.float32)
  with pytest.raises(ValueError, match=r"1 unexpected: classifier\.weight"):
    pretrained.convert(state, stage_sizes=(1, 1, 1, 1), width=8)


def write_safetensors(path, state):
  header, offset, blobs = {}, 0, []
  for k, v in state.items():
    b = np.ascontiguousarray(v, "<f4").tobytes()
    header[k] = {"dtype": "F32", "shape": list(v.shape), "data_offsets": [offset, offset + len(b)]}
    offset += len(b)
    blobs.append(b)
  h = json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(h)) + h + b"".join(blobs))


@pytest.mark.parametrize("ext", ["npz", "safetensors"])
def test_round_trip_and_truncated_file_is_an_error_naming_it(tmp_path, ext):
  state = random_state((1, 1, 1, 1), 8)
  path = tmp_path / f"w.{ext}"
  np.savez(path, **state) if ext == "npz" else write_safetensors(path, state)
  loaded = pretrained.load_state_dict(str(path))
  assert set(loaded) == set(state) and all(np.array_equal(loaded[k], state[k]) for k in state)
  data = path.read_bytes()
  path.write_bytes(data[:len(data) // 2])
  with pytest.raises(ValueError, match="truncated or corrupt") as e:
    pretrained.load_state_dict(str(path))
  assert str(path) in str(e.value)


@needs_torch
def test_pth_and_convert_cli(tmp_path):
  model = TorchResNet((1, 1, 1, 1), 8)
  src, dst = tmp_path / "w.pth", tmp_path / "w.npz"
  torch.save(model.state_dict(), src)
  out = subprocess.run([sys.executable, "-m", "fdnm_jax.convert", "--src", str(src), "--dst", str(dst),
                        "--stage_sizes", "1,1,1,1", "--width", "8"], capture_output=True, text=True)
  assert out.returncode == 0, out.stderr
  loaded = pretrained.load_state_dict(str(dst))
  assert set(loaded) == set(pretrained.expected_shapes((1, 1, 1, 1), 8))  # fc, num_batches_tracked dropped
  np.testing.assert_array_equal(loaded["layer4.0.conv2.weight"], model.layer4[0].conv2.weight.detach().numpy())
  out = subprocess.run([sys.executable, "-m", "fdnm_jax.convert", "--src", str(src), "--dst", str(dst)],
                       capture_output=True, text=True)  # ResNet-50 names expected: refused, one error
  assert out.returncode == 1 and "missing" in out.stderr and str(src) in out.stderr


# --- config.model.pretrained end to end --------------------------------------------------------------------------

def test_config_pretrained_loads_into_stems_and_stages_only(tmp_path):
  config = tiny.get_config()
  state = random_state((1, 1, 1, 1), 8)
  path = tmp_path / "tiny.npz"
  np.savez(path, **state)
  mesh = sharding.make_mesh(config.mesh)
  fresh = train.build_run(config, str(tmp_path / "a"), mesh).init_state()
  config.model.pretrained = str(path)
  loaded = train.build_run(config, str(tmp_path / "b"), mesh).init_state()
  p, bs = loaded.params, loaded.batch_stats
  for stem in ("visible_stem", "infrared_stem"):
    np.testing.assert_array_equal(p[stem]["conv1"]["kernel"], state["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(p[stem]["bn1"]["scale"], state["bn1.weight"])
    np.testing.assert_array_equal(bs[stem]["bn1"]["var"], state["bn1.running_var"])
  np.testing.assert_array_equal(p["layer3"]["block0"]["downsample_conv"]["kernel"],
                                state["layer3.0.downsample.0.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(bs["layer4"]["block0"]["bn3"]["mean"], state["layer4.0.bn3.running_mean"])
  for name in ("bnneck", "classifier"):  # not in torchvision: keep their init
    jax.tree.map(np.testing.assert_array_equal, p[name], fresh.params[name])
  assert "anm" in p and "agp1" in p
  jax.tree.map(np.testing.assert_array_equal, p["anm"], fresh.params["anm"])
  # The optimizer state is made from the merged params (momentum buffers have their shapes, zero).
  assert jax.tree.structure(loaded.opt_state) == jax.tree.structure(fresh.opt_state)


def test_pth_without_torch_says_how_to_convert(tmp_path, monkeypatch):
  path = tmp_path / "w.pth"
  path.write_bytes(b"PK\x03\x04 a zip archive's signature, not read further")
  monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` raises ImportError
  with pytest.raises(ImportError, match=r"needs torch.*python -m fdnm_jax.convert"):
    pretrained.load_state_dict(str(path))


@pytest.mark.parametrize("content", [b"hello, this is text\n", b"<html><body>403 Forbidden</body></html>", b""])
def test_a_pth_that_is_not_a_checkpoint_is_named_without_torchs_unsafe_advice(tmp_path, content):
  path = tmp_path / "resnet50-0676ba61.pth"
  path.write_bytes(content)
  with pytest.raises(CheckpointError) as e:
    pretrained.load_state_dict(str(path))
  message = str(e.value)
  assert str(path) in message and "not a PyTorch checkpoint" in message
  assert "download.pytorch.org/models/resnet50-0676ba61.pth" in message
  assert "weights_only" not in message


@needs_torch
def test_a_pickle_of_objects_is_refused_without_torchs_unsafe_advice(tmp_path):
  import datetime  # pylint: disable=g-import-not-at-top
  import pickle  # pylint: disable=g-import-not-at-top
  path = tmp_path / "w.pth"
  with open(path, "wb") as f:
    pickle.dump({"conv1.weight": datetime.date(2020, 1, 1)}, f, protocol=2)  # not a tensor: torch refuses it
  with pytest.raises(CheckpointError) as e:
    pretrained.load_state_dict(str(path))
  message = str(e.value)
  assert "torch.load(weights_only=True) failed: UnpicklingError" in message
  assert "weights_only=False" not in message and "weights_only` set to `False" not in message
