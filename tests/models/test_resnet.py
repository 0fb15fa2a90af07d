"""Tests of the two-stream torchvision-layout ResNet (fdnm_jax/models/resnet.py)."""

import jax
import jax.numpy as jnp
import numpy as np

from fdnm_jax.models import resnet
from tests.rounding import U

# torchvision.models.resnet50() without `fc` (weight 2048x1000 + bias 1000): 25,557,032 - 2,049,000.
TORCHVISION_RESNET50_NO_FC = 23_508_032


def _paths(tree) -> dict[str, tuple[int, ...]]:
  return {"/".join(str(k.key) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _abstract_resnet50(height=384, width=144, **kwargs):
  model = resnet.ResNet50(**kwargs)
  image = jax.ShapeDtypeStruct((2, height, width, 3), jnp.float32)
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), image, image)
  maps = jax.eval_shape(lambda var, v, i: model.apply(var, v, i), variables, image, image)
  return variables, maps


def _torchvision_resnet50_state_dict() -> dict[str, tuple[int, ...]]:
  """Names and shapes of torchvision's resnet50 state dict (without fc), written from its definition."""
  shapes = {"conv1.weight": (64, 3, 7, 7)}
  def bn(prefix, c):
    for suffix in ("weight", "bias", "running_mean", "running_var"):
      shapes[f"{prefix}.{suffix}"] = (c,)
  bn("bn1", 64)
  inplanes = 64
  for s, (blocks, planes) in enumerate(zip((3, 4, 6, 3), (64, 128, 256, 512)), start=1):
    for b in range(blocks):
      p = f"layer{s}.{b}"
      shapes[f"{p}.conv1.weight"] = (planes, inplanes, 1, 1)
      bn(f"{p}.bn1", planes)
      shapes[f"{p}.conv2.weight"] = (planes, planes, 3, 3)
      bn(f"{p}.bn2", planes)
      shapes[f"{p}.conv3.weight"] = (planes * 4, planes, 1, 1)
      bn(f"{p}.bn3", planes * 4)
      if b == 0:
        shapes[f"{p}.downsample.0.weight"] = (planes * 4, inplanes, 1, 1)
        bn(f"{p}.downsample.1", planes * 4)
      inplanes = planes * 4
  return shapes


def _flax_path(torch_name: str, stem: str) -> tuple[str, str]:
  """The documented mapping: torchvision key -> (collection, Flax path)."""
  parts = torch_name.split(".")
  if parts[0] in ("conv1", "bn1"):
    parts = [stem] + parts
  else:
    parts[1] = f"block{parts[1]}"
    if parts[2] == "downsample":
      parts[2:4] = ["downsample_conv" if parts[3] == "0" else "downsample_bn"]
  leaf = parts[-1]
  collection = "batch_stats" if leaf.startswith("running") else "params"
  new_leaf = {"running_mean": "mean", "running_var": "var", "bias": "bias",
              "weight": "kernel" if "conv" in parts[-2] else "scale"}[leaf]
  return collection, "/".join(parts[:-1] + [new_leaf])


def test_resnet50_one_stem_param_count_matches_torchvision():
  variables, _ = _abstract_resnet50()
  params = _paths(variables["params"])
  one_stem = sum(int(np.prod(s)) for p, s in params.items() if not p.startswith("infrared_stem/"))
  both = sum(int(np.prod(s)) for s in params.values())
  assert one_stem == TORCHVISION_RESNET50_NO_FC
  assert both == TORCHVISION_RESNET50_NO_FC + 7 * 7 * 3 * 64 + 2 * 64


def test_torchvision_state_dict_maps_one_to_one():
  variables, _ = _abstract_resnet50()
  flax = {c: _paths(variables[c]) for c in ("params", "batch_stats")}
  mapped = {"params": {}, "batch_stats": {}}
  for name, shape in _torchvision_resnet50_state_dict().items():
    if len(shape) == 4:
      shape = (shape[2], shape[3], shape[1], shape[0])  # OIHW -> HWIO
    for stem in ("visible_stem", "infrared_stem"):
      collection, path = _flax_path(name, stem)
      mapped[collection][path] = shape
  assert mapped["params"] == flax["params"]
  assert mapped["batch_stats"] == flax["batch_stats"]


def test_resnet50_feature_map_shapes_384x144():
  _, maps = _abstract_resnet50()
  shapes = {k: v.shape for k, v in maps.items()}
  assert shapes == {"stem": (4, 96, 36, 64), "layer1": (4, 96, 36, 256), "layer2": (4, 48, 18, 512),
                    "layer3": (4, 24, 9, 1024), "layer4": (4, 24, 9, 2048)}
  _, maps = _abstract_resnet50(last_stride=2)
  assert maps["layer4"].shape == (4, 12, 5, 2048)


def _np_conv(x, kernel, stride, pad):
  x = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kh, kw, _, co = kernel.shape
  h = (x.shape[1] - kh) // stride + 1
  w = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], h, w, co))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum("bhwc,cd->bhwd", x[:, i:i + stride * h:stride, j:j + stride * w:stride], kernel[i, j])
  return out


def _np_bn(x, p, s):
  return (x - s["mean"]) / np.sqrt(s["var"] + 1e-5) * p["scale"] + p["bias"]


def _np_maxpool(x):
  x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
  h = (x.shape[1] - 3) // 2 + 1
  w = (x.shape[2] - 3) // 2 + 1
  out = np.full((x.shape[0], h, w, x.shape[3]), -np.inf)
  for i in range(3):
    for j in range(3):
      out = np.maximum(out, x[:, i:i + 2 * h:2, j:j + 2 * w:2])
  return out


def _conv_bn_error(x, error, kernel, stride, pad, p, s):
  """Worst-case float32 error of _np_bn(_np_conv(x, kernel, ...)) for an input x (float64 reference values)
  computed to within `error`, with float32 kernel and BatchNorm variables (exact).

  The conv is kh kw Cin-term dot products: gamma_(K+1) of the conv of magnitudes (+1: any contraction order), plus
  the input's error through |kernel|. Flax's BatchNorm, (y - mean) * (scale * rsqrt(var + eps)) + bias, rounds 6
  times (rsqrt's 2 ulps included): <= 6 u of |y - mean| gain + |bias|, and its gain |scale| / sqrt(var + eps)
  scales the conv's error. ReLU and max-pool are 1-Lipschitz: an error bound passes through them (max-pool: the
  window's maximum).
  """
  magnitude = np.abs(np.asarray(kernel, np.float64))
  terms = int(np.prod(magnitude.shape[:3]))
  gain = np.abs(np.asarray(p["scale"], np.float64)) / np.sqrt(np.asarray(s["var"], np.float64) + 1e-5)
  centred = np.abs(_np_conv(x, np.asarray(kernel, np.float64), stride, pad) - s["mean"])
  conv_error = _np_conv(error, magnitude, stride, pad) + (terms + 1) * U * _np_conv(np.abs(x), magnitude, stride, pad)
  return gain * conv_error + 6 * U * (centred * gain + np.abs(p["bias"]))


def _randomise(variables, seed):
  rng = np.random.default_rng(seed)
  def fill(path, leaf):
    name = path[-1].key
    if name == "var":
      return rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32)
    if name == "scale":
      return rng.uniform(0.5, 1.5, leaf.shape).astype(np.float32)
    if name in ("bias", "mean"):
      return rng.normal(0.0, 0.3, leaf.shape).astype(np.float32)
    return np.asarray(leaf)
  return jax.tree_util.tree_map_with_path(fill, variables)


def test_stem_matches_numpy_torchvision_conventions():
  stem = resnet.Stem(width=4)
  x = np.random.default_rng(0).normal(size=(2, 11, 9, 3)).astype(np.float32)
  variables = _randomise(jax.jit(stem.init)(jax.random.key(0), x), 1)
  y = jax.jit(lambda v, i: stem.apply(v, i, train=False))(variables, x)
  p, s = variables["params"], variables["batch_stats"]
  ref = _np_conv(x.astype(np.float64), np.asarray(p["conv1"]["kernel"], np.float64), 2, 3)
  ref = _np_maxpool(np.maximum(_np_bn(ref, p["bn1"], s["bn1"]), 0.0))
  assert y.shape == ref.shape == (2, 3, 3, 4)
  # Worst-case float32 error per output (`_conv_bn_error`: 147-term conv, BatchNorm, max over the window), up to
  # 9.3e-5 here: above a fixed 1e-5 + 1e-5 |y|.
  error = _conv_bn_error(x.astype(np.float64), np.zeros(x.shape), p["conv1"]["kernel"], 2, 3, p["bn1"], s["bn1"])
  np.testing.assert_array_less(np.abs(np.asarray(y) - ref), _np_maxpool(error))


def test_bottleneck_with_downsample_matches_numpy():
  block = resnet.Bottleneck(width=4, stride=2)
  x = np.random.default_rng(2).normal(size=(2, 7, 6, 8)).astype(np.float32)
  variables = _randomise(jax.jit(block.init)(jax.random.key(0), x), 3)
  y = jax.jit(lambda v, i: block.apply(v, i, train=False))(variables, x)
  p, s = variables["params"], variables["batch_stats"]
  k = lambda name: np.asarray(p[name]["kernel"], np.float64)
  h1 = np.maximum(_np_bn(_np_conv(x, k("conv1"), 1, 0), p["bn1"], s["bn1"]), 0)
  h2 = np.maximum(_np_bn(_np_conv(h1, k("conv2"), 2, 1), p["bn2"], s["bn2"]), 0)
  h = _np_bn(_np_conv(h2, k("conv3"), 1, 0), p["bn3"], s["bn3"])
  r = _np_bn(_np_conv(x, k("downsample_conv"), 2, 0), p["downsample_bn"], s["downsample_bn"])
  ref = np.maximum(h + r, 0)
  assert y.shape == ref.shape == (2, 4, 3, 16)
  # Worst-case float32 error per output, layer by layer (`_conv_bn_error`: 8-, 36- and 4-term convs and the 8-term
  # shortcut, each through its BatchNorm), plus the residual sum's rounding: up to 1.1e-4 here, above a fixed
  # 1e-5 + 1e-5 |y|.
  x64 = x.astype(np.float64)
  error = _conv_bn_error(x64, np.zeros(x.shape), k("conv1"), 1, 0, p["bn1"], s["bn1"])
  error = _conv_bn_error(h1, error, k("conv2"), 2, 1, p["bn2"], s["bn2"])
  error = _conv_bn_error(h2, error, k("conv3"), 1, 0, p["bn3"], s["bn3"])
  error += _conv_bn_error(x64, np.zeros(x.shape), k("downsample_conv"), 2, 0, p["downsample_bn"], s["downsample_bn"])
  np.testing.assert_array_less(np.abs(np.asarray(y) - ref), error + U * np.abs(h + r))


def test_init_follows_torchvision():
  block = resnet.Bottleneck(width=64)
  variables = jax.jit(block.init)(jax.random.key(0), np.zeros((1, 2, 2, 256), np.float32))
  p = variables["params"]
  assert "downsample_conv" not in p  # 256 -> 256, stride 1: identity shortcut
  kernel = np.asarray(p["conv2"]["kernel"])  # fan_out = 3 * 3 * 64
  # N = 36,864 normal samples: the sample std's relative standard error is 1 / sqrt(2 N) = 3.7e-3, so 0.03 is
  # 8 sigma; the mean's is std / sqrt(N) = 3.1e-4, so 0.002 is 6.5 sigma.
  assert abs(kernel.std() / np.sqrt(2.0 / (9 * 64)) - 1.0) < 0.03
  assert abs(kernel.mean()) < 0.002
  for name in ("bn1", "bn2", "bn3"):
    np.testing.assert_array_equal(p[name]["scale"], 1.0)
    np.testing.assert_array_equal(p[name]["bias"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"][name]["var"], 1.0)


def test_bfloat16_compute_keeps_float32_params():
  model = resnet.ResNetTiny(dtype=jnp.bfloat16)
  image = jax.ShapeDtypeStruct((1, 32, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda v, i: model.init(jax.random.key(0), v, i), image, image)
  assert {leaf.dtype for leaf in jax.tree.leaves(variables)} == {jnp.dtype(jnp.float32)}
  maps = jax.eval_shape(lambda var, v, i: model.apply(var, v, i), variables, image, image)
  assert maps["layer4"].dtype == jnp.bfloat16
  assert maps["layer4"].shape == (2, 2, 1, 256)


def test_one_modality_only():
  model = resnet.ResNetTiny()
  image = jax.ShapeDtypeStruct((3, 32, 16, 3), jnp.float32)
  variables = jax.eval_shape(lambda v: model.init(jax.random.key(0), v, None), image)
  assert "infrared_stem" not in variables["params"]
  maps = jax.eval_shape(lambda var, v: model.apply(var, v, None), variables, image)
  assert maps["layer4"].shape[0] == 3


def test_stem_max_pool_matches_reduce_window_values_and_gradients():
  """The slice-maximum pool equals lax.reduce_window's 3x3/2 max-pool (pad 1), gradients included (no ties)."""
  for shape in [(2, 9, 7, 3), (2, 8, 6, 3)]:
    x = np.random.default_rng(0).standard_normal(shape, np.float32)
    pool = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                           ((0, 0), (1, 1), (1, 1), (0, 0)))
    np.testing.assert_array_equal(np.asarray(jax.jit(resnet.max_pool_3x3_stride2)(x)), np.asarray(jax.jit(pool)(x)))
    grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(f(v)) * jnp.arange(f(v).size).reshape(f(v).shape))))(x)
    # Not bitwise: an input that is the maximum of several windows (up to 4) sums their cotangents, and the two
    # rules sum them in different orders (measured: 1 ulp at one input). Each order is within 3 u of the sum of
    # the cotangents' magnitudes, and each program's cotangent cos(y) * index within 3 u of its own (cos: 2 ulps):
    # they differ by <= 12 u of that sum (the first-maximum gradient of |cotangent|; no ties here).
    out = np.asarray(jax.jit(pool)(x), np.float64)
    cotangent = np.abs(np.cos(out) * np.arange(out.size).reshape(out.shape))
    bound = 12 * U * _np_max_pool_grad_first_max(x, cotangent)
    gap = np.abs(np.asarray(grad(resnet.max_pool_3x3_stride2)) - np.asarray(grad(pool)))
    assert np.all(gap <= bound), np.max(gap - bound)  # inputs that are no window's maximum: 0 = 0.


def _np_max_pool_grad_first_max(x, grad_out):
  """NumPy loop: each output's gradient goes to the first maximal input of its 3x3/2 window (pad 1), row-major."""
  batch, height, width, channels = x.shape
  out_h, out_w = grad_out.shape[1:3]
  grad = np.zeros_like(x, dtype=np.float64)
  for b in range(batch):
    for c in range(channels):
      for i in range(out_h):
        for j in range(out_w):
          cells = [(r, s) for r in range(2 * i - 1, 2 * i + 2) for s in range(2 * j - 1, 2 * j + 2)
                   if 0 <= r < height and 0 <= s < width]
          best = max(x[b, r, s, c] for r, s in cells)
          r, s = next((r, s) for r, s in cells if x[b, r, s, c] == best)
          grad[b, r, s, c] += grad_out[b, i, j, c]
  return grad


def test_stem_max_pool_gradient_at_ties_goes_to_the_first_maximum():
  """After ReLU many inputs tie (zeros); PyTorch gives each output's gradient to its window's first maximum."""
  rng = np.random.default_rng(3)
  x = np.maximum(rng.integers(-3, 3, size=(2, 7, 6, 2)), 0).astype(np.float32)  # ~60 % zeros, repeated values
  grad_out = rng.normal(size=(2, 4, 3, 2)).astype(np.float32)
  (grad,) = jax.jit(lambda v, g: jax.vjp(resnet.max_pool_3x3_stride2, v)[1](g))(x, grad_out)
  # Each input's gradient is a float32 sum of <= 4 of the cotangents: <= 3 u of their magnitudes' sum, which is
  # <= 4.6 here: 8.2e-7, within 1e-6.
  np.testing.assert_allclose(np.asarray(grad), _np_max_pool_grad_first_max(x, grad_out), atol=1e-6)


def _custom_calls(fn, *args):
  """How many custom-VJP calls the jaxpr of the gradient of `fn` holds."""
  count = 0

  def walk(jaxpr):
    nonlocal count
    for eqn in jaxpr.eqns:
      count += eqn.primitive.name.startswith("custom_vjp")
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)

  walk(jax.make_jaxpr(jax.grad(lambda *a: jnp.sum(jnp.sin(fn(*a))), argnums=tuple(range(len(args)))))(*args).jaxpr)
  return count


def test_off_cpu_gradient_path_is_jax_own_rule_and_matches_the_cpu_rule():
  """`linear.gradient_rule("plain")` forces what other platforms lower (linear.cpu_only_rule): no custom VJP is
  left in the stem pool or the 1x1 conv, and their gradients equal the CPU custom rules' and lax.reduce_window's
  (JAX's own max-pool rule; no ties in these inputs). Under "auto" the CPU program keeps the custom rules."""
  from fdnm_jax.models import linear  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(5)
  x = rng.standard_normal((2, 9, 7, 6), np.float32)
  kernel = rng.standard_normal((6, 10), np.float32)
  pool = lambda v: jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 2, 2, 1),
                                         ((0, 0), (1, 1), (1, 1), (0, 0)))
  matmul = lambda v, k: linear.channel_dense_matmul(v, k)
  reference = {"pool": jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(pool(v)))))(x),
               "matmul": jax.jit(jax.grad(lambda v, k: jnp.sum(jnp.sin(jnp.einsum("...i,io->...o", v, k,
                                                                                   precision="highest"))),
                                          argnums=(0, 1)))(x, kernel)}
  for rule in ("plain", "custom", "auto"):
    with linear.gradient_rule(rule):
      assert (_custom_calls(resnet.stem_max_pool, x) > 0) == (rule != "plain"), rule
      assert (_custom_calls(matmul, x, kernel) > 0) == (rule != "plain"), rule
      # Fresh functions jitted inside the block: traced, hence routed, under `rule`.
      got_pool = jax.jit(jax.grad(lambda v: jnp.sum(jnp.sin(resnet.stem_max_pool(v)))))(x)
      got_matmul = jax.jit(jax.grad(lambda v, k: jnp.sum(jnp.sin(matmul(v, k))), argnums=(0, 1)))(x, kernel)
    np.testing.assert_array_equal(np.asarray(got_pool), np.asarray(reference["pool"]))  # routing only: exact.
    # A 6-term float32 dot product reassociated: ~1e-6 relative of O(1) values.
    for got, want in zip(got_matmul, reference["matmul"]):
      np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)
