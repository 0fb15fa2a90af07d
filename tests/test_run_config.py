"""fdnm_jax.run_config: validation of every field, the workdir contract (diff, roles, history), without JAX.

Each check is on a tiny hand-made case: the expected field names, values and rules come from configs/default.py's
comments and FDNM_SPEC.md, not from the code's own output.
"""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import casia_nir_vis, default, llcm, regdb, synthetic, sysu
from fdnm_jax import run_config
from fdnm_jax.errors import ConfigError, WorkdirError
from tests import subprocesses
from tests.configs import tiny


def _problems(**overrides):
  """run_config.problems of the tiny config with dotted-name overrides."""
  config = tiny.get_config()
  for key, value in overrides.items():
    section, field = key.split("__")
    config[section][field] = value
  return run_config.problems(config)


def test_the_shipped_configs_are_valid_once_given_their_data_and_init():
  for module in (default, synthetic, tiny):
    assert run_config.problems(module.get_config()) == [], module.__name__
  for module in (sysu, regdb, llcm, casia_nir_vis):
    config = module.get_config()
    config.data.root = "/data/x"
    config.model.pretrained = "none"
    assert run_config.problems(config) == [], module.__name__


@pytest.mark.parametrize("field, value, words", [
    ("optim__base_lr", -0.01, "optim.base_lr=-0.01: expected a learning rate >= 0"),
    ("optim__head_lr", -1.0, "optim.head_lr=-1.0: expected a learning rate >= 0"),
    ("input__num_ids_per_batch", 0, "input.num_ids_per_batch=0: expected an integer >= 2"),
    ("input__num_ids_per_batch", 1, "input.num_ids_per_batch=1: expected an integer >= 2"),
    ("input__num_instances", 0, "input.num_instances=0: expected an integer >= 1"),
    ("model__anm_stage", 9, "model.anm_stage=9: expected 0 (no ANM) or a stage in 1..4"),
    ("model__agp_stages", (1, 9), "model.agp_stages=[1, 9]: expected distinct stages in 1..4"),
    ("model__agp_stages", (2, 2), "model.agp_stages=[2, 2]: expected distinct stages"),
    ("model__last_stride", 3, "model.last_stride=3: expected 1 or 2"),
    ("model__dtype", "float16", "model.dtype=\"float16\": expected float32 or bfloat16"),
    ("model__spectral_transform", "dct", "model.spectral_transform=\"dct\": expected fft or dft_matmul"),
    ("model__bn_momentum", 1.0, "model.bn_momentum=1.0: expected a decay in [0, 1)"),
    ("model__anm_bn", "shared", "model.anm_bn=\"shared\": expected reference, joint, per_branch or none"),
    ("model__anm_inorm_stats", "dc", "model.anm_inorm_stats=\"dc\": expected instance or exclude_dc"),
    ("model__phase_guard", "clip", "model.phase_guard=\"clip\": expected exact, reference, floor or soft"),
    ("model__phase_floor", 1.0, "model.phase_floor=1.0: expected a fraction of the channel's RMS amplitude in [0, 1)"),
    ("model__phase_soft_eps", -1e-6, "model.phase_soft_eps=-1e-06: expected a fraction of the channel's RMS"),
    ("model__cnm_original", "bn", "model.cnm_original=\"bn\": expected raw or batch_standardized"),
    ("evals__embedding", "concat", "evals.embedding=\"concat\": expected spec or deen"),
    ("evals__recalibrate_bn_batches", -1, "evals.recalibrate_bn_batches=-1: expected an integer >= 0"),
    ("evals__health_max_mean_cosine", 0.0, "evals.health_max_mean_cosine=0.0: expected a mean cosine in (0, 1]"),
    ("evals__select_metric", "map", "evals.select_metric=\"map\": expected a metric of the selection split"),
    ("dataset", "market", "dataset=\"market\": expected a known data set"),
    ("data__trial", 11, "data.trial=11: expected a RegDB split in 1..10"),
    ("data__trial", 0, "data.trial=0: expected a RegDB split in 1..10"),
    ("data__fold", 0, "data.fold=0: expected a CASIA NIR-VIS 2.0 fold in 1..10"),
    ("data__num_val_ids", -1, "data.num_val_ids=-1: expected an integer >= 0"),
    ("mesh__data", 0, "mesh.data=0: expected -1"),
    ("mesh__fsdp", 0, "mesh.fsdp=0: expected an integer >= 1"),
    ("input__eval_batch_size", 0, "input.eval_batch_size=0: expected an integer >= 1"),
    ("input__random_erasing", 1.5, "input.random_erasing=1.5: expected a probability in [0, 1]"),
    ("input__random_grayscale", -0.1, "input.random_grayscale=-0.1: expected a probability in [0, 1]"),
    ("input__erasing_area", (0.5, 0.1), "input.erasing_area=[0.5, 0.1]: expected two fractions (low, high)"),
    ("input__erasing_area", (0.1,), "input.erasing_area=[0.1]: expected two fractions"),
    ("input__erasing_area", (0.0, 0.4), "input.erasing_area=[0.0, 0.4]: expected two fractions"),
    ("input__erasing_min_aspect", 0.0, "input.erasing_min_aspect=0.0: expected a number in (0, 1]"),
    ("loss__label_smoothing", 1.0, "loss.label_smoothing=1.0: expected a number in [0, 1)"),
    ("loss__triplet", "soft", "loss.triplet=\"soft\": expected hard or wrt"),
    ("loss__cnm_weight", -0.8, "loss.cnm_weight=-0.8: expected a number >= 0"),
    ("schedule__num_epochs", 0, "schedule.num_epochs=0: expected an integer >= 1"),
    ("schedule__decay_epochs", (80, 20), "schedule.decay_epochs=[80, 20]: expected increasing integers"),
    ("schedule__decay_factor", 0.0, "schedule.decay_factor=0.0: expected a number in (0, 1]"),
    ("logging__every_steps", 0, "logging.every_steps=0: expected an integer >= 1"),
    ("checkpoint__keep", 0, "checkpoint.keep=0: expected an integer >= 1"),
    ("evals__sysu_gallery_sampling", "random", "evals.sysu_gallery_sampling=\"random\": expected seeded or official"),
    ("evals__rerank_lambda", 2.0, "evals.rerank_lambda=2.0: expected a weight in [0, 1]"),
    ("name", "my run", "name=\"my run\": expected a non-empty file name"),
    ("seed", -1, "seed=-1: expected an integer >= 0"),
])
def test_a_bad_field_is_named_with_its_value_and_rule(field, value, words):
  if "__" not in field:
    config = tiny.get_config()
    config[field] = value
    found = run_config.problems(config)
  else:
    found = _problems(**{field: value})
  assert any(words in p for p in found), found
  assert len(found) == 1, found


def test_every_bad_field_is_in_one_error():
  config = tiny.get_config()
  config.optim.base_lr = -0.1
  config.input.num_ids_per_batch = 0
  config.model.anm_stage = 9
  config.data.trial = 11
  with pytest.raises(ConfigError) as e:
    run_config.validate(config)
  message = str(e.value)
  assert message.startswith("4 config problems: ") and "\n" not in message
  for field in ("optim.base_lr=-0.1", "input.num_ids_per_batch=0", "model.anm_stage=9", "data.trial=11"):
    assert field in message


def test_types_follow_the_defaults():
  config = ml_collections.ConfigDict(tiny.get_config().to_dict(), type_safe=False)  # e.g. a config read from JSON.
  config.model.width = "8"
  config.input.flip = 1
  config.optim.base_lr = float("nan")
  config.model.stage_sizes = (1, 1.5, 1, 1)
  found = run_config.problems(config)
  assert 'model.width="8": expected an integer' in found
  assert "input.flip=1: expected true or false" in found
  assert "optim.base_lr=nan: expected a finite number" in found
  assert any(p.startswith("model.stage_sizes=[1, 1.5, 1, 1]: expected a non-empty tuple of integers") for p in found)


def test_a_field_a_config_file_adds_by_mistake_is_named_with_the_closest_field():
  config = tiny.get_config()
  with config.unlocked():
    config.model.widht = 16
  (problem,) = run_config.problems(config)
  assert problem.startswith("model.widht: not a field of fdnm-jax (did you mean model.width?)")


def test_a_missing_field_is_named():
  config = ml_collections.ConfigDict(tiny.get_config().to_dict())
  del config.data["root"]
  assert run_config.problems(config) == ["data.root: missing; build configs from configs.default.get_config()"]


def test_fields_that_depend_on_each_other():
  # AGP's gate splits C = width * 2**(s-1) * 4 channels into agp_groups groups (tiny: width 8 -> 32 after stage 1).
  assert any("model.agp_groups=3: does not divide the 32 channels after stage 1" in p
             for p in _problems(model__agp_groups=3))
  assert _problems(model__agp_groups=8) == []  # divides 32 and 64.
  assert any("model.anm_keep_original=true: needs ANM" in p
             for p in _problems(model__anm_keep_original=True, model__anm_stage=0))
  # 32 x 16 input, 4 stages, last stride 1: 32 -> 16 -> 8 (stem) -> 8 -> 4 -> 2 -> 2 rows.
  assert any("model.num_parts=3: more stripes than the 2 rows" in p for p in _problems(model__num_parts=3))
  assert _problems(model__num_parts=2) == []
  assert any("nothing to train" in p for p in _problems(loss__id_weight=0.0, loss__triplet_weight=0.0,
                                                          loss__cnm_weight=0.0))
  assert any("both 0, nothing would train" in p for p in _problems(optim__base_lr=0.0, optim__head_lr=0.0))
  assert _problems(optim__base_lr=0.0) == []  # a frozen backbone with a trained head is a valid experiment.


def test_final_map_height_follows_the_spec_shapes():
  # FDNM_SPEC.md §1: 384 x 144 -> layer4 24 x 9 with last stride 1; torchvision's ResNet-50 halves it with 2.
  assert run_config._final_map_height(384, 4, 1) == 24
  assert run_config._final_map_height(144, 4, 1) == 9
  assert run_config._final_map_height(384, 4, 2) == 12
  # SAME padding rounds up: 33 -> 17 -> 9 -> 9 -> 5 -> 3 -> 3.
  assert run_config._final_map_height(33, 4, 1) == 3


@pytest.mark.parametrize("dataset, folder", [("sysu", "SYSU-MM01"), ("regdb", "RegDB"), ("llcm", "LLCM"),
                                             ("casia_nir_vis", "NIR-VIS-2.0")])
def test_downloaded_data_sets_need_their_folder(dataset, folder):
  config = tiny.get_config()
  config.dataset = dataset
  (problem,) = run_config.problems(config)
  assert f"--config.data.root=/path/to/{folder}" in problem
  config.data.data_dir = "/data/tfds"  # a prepared folder instead
  assert run_config.problems(config) == []


def test_data_set_dependent_eval_fields():
  config = tiny.get_config()
  config.evals.face_folds = (1, 2)
  assert any("evals.face_folds=[1, 2]: only for dataset casia_nir_vis" in p for p in run_config.problems(config))
  config = casia_nir_vis.get_config()
  config.data.root, config.model.pretrained = "/data/x", "none"
  config.evals.rerank = True
  assert any("not part of the face protocol" in p for p in run_config.problems(config))


# --- the ImageNet init rule (issue 16) --------------------------------------------------------------------------

@pytest.mark.parametrize("module", [sysu, regdb, llcm, casia_nir_vis])
def test_data_set_recipes_refuse_a_fresh_run_without_weights(module, tmp_path):
  config = module.get_config()
  config.data.root = str(tmp_path)
  (problem,) = run_config.problems(config)
  assert problem.startswith("model.pretrained: not given")
  for words in ("resnet50-0676ba61.pth", "ResNet50_Weights.IMAGENET1K_V1",
                "https://download.pytorch.org/models/resnet50-0676ba61.pth", "python -m fdnm_jax.convert",
                "--config.model.pretrained=none"):
    assert words in problem
  assert run_config.problems(config, fresh=False) == []  # a resume restores its checkpoint instead.
  config.model.pretrained = "none"
  assert run_config.problems(config) == []
  weights = tmp_path / "resnet50.npz"
  config.model.pretrained = str(weights)
  assert any("no such file" in p for p in run_config.problems(config))
  weights.write_bytes(b"")
  assert run_config.problems(config) == []  # existence only here; train.py reads and checks the names and shapes.
  config.model.pretrained = str(tmp_path / "resnet50.ckpt")
  assert any("unknown file type '.ckpt'" in p for p in run_config.problems(config))


def test_synthetic_demo_trains_from_scratch_without_a_flag_and_says_so_in_config_json(tmp_path):
  config = synthetic.get_config()
  assert run_config.problems(config) == []
  run_config.write_stored(str(tmp_path), config)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["model"]["pretrained"] == "none"
  assert os.listdir(tmp_path) == ["config.json"]  # written through a temp file, nothing left beside it.


# --- roles and diffs ---------------------------------------------------------------------------------------------

def test_roles_of_fields():
  for key in ("model.width", "optim.base_lr", "loss.cnm_weight", "input.height", "input.random_erasing", "seed",
              "data.trial", "synthetic.seed", "schedule.num_epochs", "model.pretrained", "data.skip_corrupt"):
    assert run_config.field_role(key) == "trained", key
  for key in ("name", "evals.test_flip", "checkpoint.every_steps", "logging.every_steps", "mesh.data",
              "input.eval_batch_size", "data.root", "data.data_dir", "model.require_pretrained"):
    assert run_config.field_role(key) == "free", key
  for key in ("model.width", "model.anm_keep_original", "model.spectral_transform", "model.bn_momentum",
              "input.height", "dataset", "data.trial", "data.num_val_ids"):
    assert run_config.blocks_evaluation(key), key
  for key in ("model.pretrained", "optim.base_lr", "evals.test_flip", "input.eval_batch_size", "data.root"):
    assert not run_config.blocks_evaluation(key), key


def test_diff_treats_empty_and_none_init_as_the_same():
  a, b = tiny.get_config(), tiny.get_config()
  b.model.pretrained = "none"
  assert run_config.diff(a, b) == []
  b.model.pretrained = "/w.npz"
  b.optim.base_lr = 0.05
  assert [str(c) for c in run_config.diff(a, b)] == ['model.pretrained: "" -> "/w.npz"', "optim.base_lr: 0.1 -> 0.05"]


# --- the contract of a workdir -----------------------------------------------------------------------------------

@pytest.fixture
def stored(tmp_path):
  workdir = str(tmp_path / "run")
  os.makedirs(os.path.join(workdir, "checkpoints", "4"))
  run_config.write_stored(workdir, tiny.get_config())
  return workdir


def test_a_fresh_workdir_has_no_contract(tmp_path):
  contract = run_config.check_contract(str(tmp_path / "new"), tiny.get_config())
  assert contract.fresh and contract.changes == () and not os.path.exists(tmp_path / "new")


def test_free_fields_may_differ_and_are_listed(stored):
  config = tiny.get_config()
  config.evals.test_flip = not config.evals.test_flip
  config.input.eval_batch_size = 8
  contract = run_config.check_contract(stored, config)
  assert not contract.fresh and contract.accepted == ()
  flip = f"{str(not config.evals.test_flip).lower()} -> {str(config.evals.test_flip).lower()}"
  assert contract.describe_free() == f"evals.test_flip: {flip}; input.eval_batch_size: 16 -> 8"


def test_a_resume_with_other_trained_fields_stops_listing_them(stored):
  config = tiny.get_config()
  config.optim.base_lr = 0.05
  config.loss.cnm_weight = 0.5
  config.logging.every_steps = 2  # free: not listed as a reason to stop
  with pytest.raises(WorkdirError) as e:
    run_config.check_contract(stored, config)
  message = str(e.value)
  assert "2 field(s)" in message and "loss.cnm_weight: 0.8 -> 0.5; optim.base_lr: 0.1 -> 0.05" in message
  assert "logging" not in message
  assert "new --workdir" in message and "--allow_config_change" in message and "step 4" in message


def test_an_allowed_change_becomes_a_segment_and_the_next_command_compares_with_it(stored):
  original = open(run_config.config_path(stored)).read()
  config = tiny.get_config()
  config.optim.base_lr = 0.05
  contract = run_config.check_contract(stored, config, allow_change=True)
  assert [str(c) for c in contract.accepted] == ["optim.base_lr: 0.1 -> 0.05"]
  record = run_config.record_segment(stored, contract, step=4)
  assert open(run_config.config_path(stored)).read() == original  # config.json keeps the original run.
  (line,) = open(run_config.history_path(stored)).read().splitlines()
  assert json.loads(line) == record
  assert record["step"] == 4 and record["changes"] == [{"field": "optim.base_lr", "old": 0.1, "new": 0.05}]
  assert run_config.load_stored(stored).optim.base_lr == 0.1
  assert run_config.load_effective(stored).optim.base_lr == 0.05
  assert run_config.check_contract(stored, config).changes == ()  # the new segment is the contract now.
  with pytest.raises(WorkdirError, match=r"optim.base_lr: 0.05 -> 0.1"):
    run_config.check_contract(stored, tiny.get_config())


def test_evaluation_needs_the_model_fields_and_keeps_the_runs_training_fields(stored):
  config = tiny.get_config()
  config.model.width = 16
  config.model.spectral_transform = "dft_matmul"
  with pytest.raises(ConfigError) as e:
    run_config.check_contract(stored, config, purpose="evaluate")
  assert ('model.spectral_transform (trained: "fft", --config: "dft_matmul"); model.width (trained: 8, --config: 16)'
          in str(e.value))
  config = tiny.get_config()
  config.evals.test_flip = True
  config.optim.base_lr = 0.5  # not the run's: evaluation keeps the stored value
  contract = run_config.check_contract(stored, config, purpose="evaluate")
  assert contract.config.evals.test_flip is True and contract.config.optim.base_lr == 0.1


def test_a_broken_config_json_is_a_workdir_error(stored):
  with open(run_config.config_path(stored), "w") as f:
    f.write("{not json")
  with pytest.raises(WorkdirError, match="is not valid JSON"):
    run_config.check_contract(stored, tiny.get_config())


def test_device_dependent_checks():
  config = tiny.get_config()
  run_config.validate_for_devices(config, 8)  # P*K = 8 images per modality over 8 shards.
  config.input.num_ids_per_batch = 3  # 6 images do not split over 4 shards
  with pytest.raises(ConfigError, match="= 6 images per modality do not split over the 4 batch shards"):
    run_config.validate_for_devices(config, 4)
  config = tiny.get_config()
  config.mesh.data, config.mesh.fsdp = 2, 2
  with pytest.raises(ConfigError, match="mesh.data=2 x mesh.fsdp=2 = 4 devices, but 8 are available"):
    run_config.validate_for_devices(config, 8)
  config.mesh.data, config.mesh.fsdp = -1, 3
  with pytest.raises(ConfigError, match="mesh.fsdp=3: does not divide the 8 available devices"):
    run_config.validate_for_devices(config, 8)


def test_validation_and_the_contract_import_neither_jax_nor_tensorflow(stored):
  """main.py checks the config and the workdir before the ~10 s of JAX/TF imports: those modules must stay out."""
  code = ("import sys; from fdnm_jax import run_config; from tests.configs import tiny; "
          f"run_config.validate(tiny.get_config()); run_config.check_contract({stored!r}, tiny.get_config()); "
          "heavy = [m for m in ('jax', 'tensorflow', 'flax', 'orbax') if m in sys.modules]; "
          "assert not heavy, heavy")
  proc = subprocess.run([sys.executable, "-c", code], cwd=subprocesses.REPO, capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-2000:]


def test_a_config_json_written_before_the_issue_19_fields_reads_as_the_reference_reading(tmp_path):
  """A stored model section without anm_bn, anm_inorm_stats, phase_guard, conjugate_pairs and cnm_original gets
  the reference reading (what such runs trained), whatever today's defaults are; a stored value wins."""
  saved = tiny.get_config().to_dict()
  for field in ("anm_bn", "anm_inorm_stats", "phase_guard", "conjugate_pairs", "cnm_original"):
    del saved["model"][field]
  saved["model"]["phase_guard"] = "soft"  # written by a run that had the field.
  with open(run_config.config_path(str(tmp_path)), "w") as f:
    json.dump(saved, f)
  model = run_config.load_stored(str(tmp_path)).model
  assert (model.anm_bn, model.anm_inorm_stats, model.conjugate_pairs, model.cnm_original) == (
      "reference", "instance", False, "raw")
  assert model.phase_guard == "soft"
