"""CASIA NIR-VIS 2.0 reader, TFDS builder and registry entry on a tiny tree in the data set's exact layout.

The tree (`make_casia_tree`): sessions s1..s3 with VIS/<subject>/<nnn>.jpg and NIR/<subject>/<nnn>.bmp (real JPEG
and 8-bit grayscale BMP files), protocols/{vis_train,nir_train,vis_gallery,nir_probe}_{1,2}.txt with Windows
backslash paths and CRLF line ends, and the quirks of real copies: a BOM, a trailing blank line, a NIR image listed
as .jpg but stored as .bmp, a VIS image stored as .JPG, a session whose VIS folder is spelt `vis`, and a training
subject listed with VIS images only. The expected sets are written down from the spec below, not from the reader.
"""

import logging
import os
import shutil

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from configs import default
from input_pipeline import pipeline, sources
from input_pipeline.datasets import casia_builder, casia_nir_vis
from input_pipeline.datasets.image_set import INFRARED, VISIBLE

# subject folder -> session; VIS images 001..002, NIR images 001..003 each.
SUBJECTS = {"00001": 1, "00002": 1, "00003": 1, "00004": 1, "10101": 2, "10102": 2, "10103": 2, "10104": 2,
            "20001": 3}
FOLDS = {1: (("00001", "00002", "10101", "10102"), ("00003", "00004", "10103", "10104")),
         2: (("00003", "00004", "10103", "10104"), ("00001", "00002", "10101", "10102"))}
VIS_ONLY_TRAIN = "20001"  # listed in vis_train_1.txt only: dropped from training.
NUM_VIS, NUM_NIR = 2, 3
NIR_LISTED_AS_JPG = ("10102", 2)  # nir_train_1 lists s2\NIR\10102\002.jpg; the file is 002.bmp.
VIS_STORED_UPPER = ("00003", 1)  # stored as 001.JPG, listed as 001.jpg.
LOWERCASE_VIS_SESSION = 3  # s3/vis/ on disk, VIS in the lists.
SIZE = 24


def _stored(subject, modality, n, suffix=""):
  """Relative path of an image on disk (with the quirks above)."""
  session = SUBJECTS[subject]
  folder = "vis" if modality == "VIS" and session == LOWERCASE_VIS_SESSION else modality
  ext = ".bmp" if modality == "NIR" else (".JPG" if (subject, n) == VIS_STORED_UPPER else ".jpg")
  return f"s{session}/{folder}{suffix}/{subject}/{n:03d}{ext}"


def _listed(subject, modality, n):
  """The line of a protocol list (Windows separators; NIR_LISTED_AS_JPG listed with .jpg)."""
  ext = ".jpg" if modality == "VIS" or (subject, n) == NIR_LISTED_AS_JPG else ".bmp"
  return f"s{SUBJECTS[subject]}\\{modality}\\{subject}\\{n:03d}{ext}"


def list_spec(fold):
  """list file name -> [(subject, modality, n)] in list order."""
  train, test = FOLDS[fold]
  vis_train = [(s, "VIS", n) for s in train for n in range(1, NUM_VIS + 1)]
  if fold == 1:
    vis_train += [(VIS_ONLY_TRAIN, "VIS", n) for n in range(1, NUM_VIS + 1)]
  return {f"vis_train_{fold}.txt": vis_train,
          f"nir_train_{fold}.txt": [(s, "NIR", n) for s in train for n in range(1, NUM_NIR + 1)],
          f"vis_gallery_{fold}.txt": [(s, "VIS", 1) for s in test],
          f"nir_probe_{fold}.txt": [(s, "NIR", n) for s in test for n in range(1, NUM_NIR + 1)]}


def _write_image(path, subject, modality, n):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  rng = np.random.default_rng([int(subject), n, modality == "NIR"])
  base = (int(subject) * 37) % 200
  if modality == "NIR":  # 8-bit grayscale BMP, as the NIR images are stored.
    pixels = np.clip(base + rng.integers(0, 40, (SIZE, SIZE)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(path, format="BMP")
  else:
    pixels = np.clip(base + rng.integers(0, 40, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
    Image.fromarray(pixels, "RGB").save(path, format="JPEG", quality=95)


def make_casia_tree(root, suffix=""):
  """Writes the tiny CASIA NIR-VIS 2.0 tree under `root` (see the module docstring); returns `root`."""
  for subject in SUBJECTS:
    for modality, count in (("VIS", NUM_VIS), ("NIR", NUM_NIR)):
      for n in range(1, count + 1):
        _write_image(os.path.join(root, _stored(subject, modality, n, suffix)), subject, modality, n)
  os.makedirs(os.path.join(root, "protocols"), exist_ok=True)
  for fold in FOLDS:
    for name, entries in list_spec(fold).items():
      text = "\r\n".join(_listed(*e) for e in entries) + "\r\n\r\n"
      data = text.encode("utf-8")
      if name == "vis_train_1.txt":
        data = b"\xef\xbb\xbf" + data
      with open(os.path.join(root, "protocols", name), "wb") as f:
        f.write(data)
  return root


@pytest.fixture(scope="module")
def casia_root(tmp_path_factory):
  return make_casia_tree(str(tmp_path_factory.mktemp("casia") / "NIR-VIS-2.0"))


def _expected(root, entries):
  """(absolute stored paths, subject labels, session cameras) of list entries."""
  paths = tuple(os.path.join(root, _stored(s, m, n)) for s, m, n in entries)
  return paths, [int(s) for s, _, _ in entries], [SUBJECTS[s] for s, _, _ in entries]


@pytest.mark.parametrize("fold", [1, 2])
def test_reader_gives_the_listed_images_with_subjects_and_sessions(casia_root, fold, caplog):
  with caplog.at_level(logging.WARNING):
    sets = casia_nir_vis.read_casia_nir_vis(casia_root, fold)
  spec = list_spec(fold)
  want = {"train_visible": [e for e in spec[f"vis_train_{fold}.txt"] if e[0] != VIS_ONLY_TRAIN],
          "train_infrared": spec[f"nir_train_{fold}.txt"], "gallery": spec[f"vis_gallery_{fold}.txt"],
          "probe": spec[f"nir_probe_{fold}.txt"]}
  assert set(sets) == set(want)
  for name, entries in want.items():
    paths, labels, cameras = _expected(casia_root, entries)
    s = sets[name]
    assert [os.path.normcase(p) for p in s.paths] == [os.path.normcase(p) for p in paths], name
    assert s.labels.tolist() == labels and s.cameras.tolist() == cameras, name
    assert s.modality == (VISIBLE if name in ("train_visible", "gallery") else INFRARED)
    assert all(os.path.isfile(p) for p in s.paths)
  assert set(sets["gallery"].labels.tolist()) == {int(s) for s in FOLDS[fold][1]}  # one VIS image per test subject.
  assert len(sets["gallery"]) == len(FOLDS[fold][1])
  if fold == 1:
    assert "1 training subject(s) have images of only one modality" in caplog.text and "20001" in caplog.text


def test_decoded_images_go_through_the_pipeline_decoder(casia_root):
  sets = casia_nir_vis.read_casia_nir_vis(casia_root, 1)
  for path in (sets["probe"].paths[0], sets["gallery"].paths[0]):
    image = pipeline.decode(path).numpy()
    assert image.shape == (SIZE, SIZE, 3)
  gray = np.asarray(Image.open(sets["probe"].paths[0]))
  np.testing.assert_array_equal(pipeline.decode(sets["probe"].paths[0]).numpy()[..., 1], gray)


def _copy_tree(src, dst):
  shutil.copytree(src, dst)
  return dst


def test_missing_image_error_names_the_list_and_line_or_is_skipped_and_counted(casia_root, tmp_path, caplog):
  root = _copy_tree(casia_root, str(tmp_path / "copy"))
  os.remove(os.path.join(root, _stored("00004", "NIR", 2)))
  with pytest.raises(FileNotFoundError) as e:
    casia_nir_vis.read_casia_nir_vis(root, 1)
  line = [i for i, x in enumerate(list_spec(1)["nir_probe_1.txt"], 1) if x == ("00004", "NIR", 2)][0]
  message = str(e.value)
  assert f"protocols/nir_probe_1.txt, line {line}" in message and "s1\\NIR\\00004\\002.bmp" in message
  assert "skip_missing_images" in message and "protocols/" in message
  with caplog.at_level(logging.WARNING):
    sets = casia_nir_vis.read_casia_nir_vis(root, 1, skip_missing=True)
  assert len(sets["probe"]) == len(list_spec(1)["nir_probe_1.txt"]) - 1
  assert "skipped 1 image(s) of protocols/nir_probe_1.txt" in caplog.text


def test_layout_errors_name_the_file_and_the_layout(casia_root, tmp_path):
  with pytest.raises(FileNotFoundError, match="folder .* not found: expected the CASIA NIR-VIS 2.0 layout"):
    casia_nir_vis.read_casia_nir_vis(str(tmp_path / "nowhere"), 1)
  root = _copy_tree(casia_root, str(tmp_path / "copy"))
  os.remove(os.path.join(root, "protocols", "nir_probe_2.txt"))
  with pytest.raises(FileNotFoundError, match=r"protocol list protocols/nir_probe_2.txt not found under .*s1/ .. s4/"):
    casia_nir_vis.read_casia_nir_vis(root, 2)
  with pytest.raises(ValueError, match="config.data.fold"):
    casia_nir_vis.read_casia_nir_vis(root, 11)
  with open(os.path.join(root, "protocols", "vis_gallery_1.txt"), "a") as f:
    f.write("s1\\NIR\\00003\\001.bmp\r\n")  # a NIR image in a VIS list.
  n = len(list_spec(1)["vis_gallery_1.txt"]) + 2  # after the blank line.
  with pytest.raises(ValueError, match=rf"vis_gallery_1.txt, line {n}: expected an image path like s2\\VIS"):
    casia_nir_vis.read_casia_nir_vis(root, 1)


def test_modality_folder_suffix_reads_the_cropped_copies(tmp_path):
  root = make_casia_tree(str(tmp_path / "cropped"), suffix="_128x128")
  sets = casia_nir_vis.read_casia_nir_vis(root, 2, modality_suffix="_128x128")
  assert all("_128x128" in p for s in sets.values() for p in s.paths)
  assert len(sets["probe"]) == len(list_spec(2)["nir_probe_2.txt"])
  with pytest.raises(FileNotFoundError, match="not found"):
    casia_nir_vis.read_casia_nir_vis(root, 2)


def test_builder_stores_the_reader_sets_and_reads_back(casia_root, tmp_path):
  builder = casia_builder.CasiaNirVis(config="fold_1", data_dir=str(tmp_path / "tfds"))
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=casia_root))
  back = casia_builder.read_prepared_fold(builder.data_dir, 1)
  raw = casia_nir_vis.read_casia_nir_vis(casia_root, 1)
  for name, s in raw.items():
    b = back[name]
    assert list(b.paths) == [os.path.relpath(p, casia_root).replace(os.sep, "/") for p in s.paths], name
    assert b.labels.tolist() == s.labels.tolist() and b.cameras.tolist() == s.cameras.tolist(), name
    assert b.modality == s.modality
    for path, data in zip(s.paths, b.encoded):
      with open(path, "rb") as f:
        assert f.read() == data
  assert builder.info.splits["probe"].num_examples == len(list_spec(1)["nir_probe_1.txt"])
  with pytest.raises(ValueError, match="--config.data.fold=1"):
    casia_builder.read_prepared_fold(builder.data_dir, 2)
  # The registry reads the prepared fold instead of the download when config.data.data_dir is set.
  config = _config("")
  config.data.data_dir = builder.data_dir
  source = sources.load_source(config, "/unused")
  assert sorted(source.test_sets) == ["gallery_1", "probe_1"] and source.protocol == "face"
  assert source.test_sets["probe_1"].labels.tolist() == raw["probe"].labels.tolist()
  assert source.train_infrared.encoded == back["train_infrared"].encoded
  config.evals.face_folds = (1, 2)
  with pytest.raises(ValueError, match="holds one fold"):
    sources.load_source(config, "/unused")


def _config(root, **evals):
  config = default.get_config()
  config.dataset = "casia_nir_vis"
  config.data.root = root
  for k, v in evals.items():
    setattr(config.evals, k, v)
  return config


def test_registry_builds_the_face_source_for_one_or_several_folds(casia_root):
  source = sources.load_source(_config(casia_root), "/unused")
  assert source.protocol == "face" and [d.name for d in source.directions] == ["nir_to_vis"]
  assert sorted(source.test_sets) == ["gallery_1", "probe_1"]
  assert sorted(set(source.train_visible.labels.tolist())) == sorted(int(s) for s in FOLDS[1][0])
  assert pipeline.num_classes(source.train_visible, source.train_infrared) == len(FOLDS[1][0])
  source = sources.load_source(_config(casia_root, face_folds=(1, 2)), "/unused")
  assert sorted(source.test_sets) == ["gallery_1", "gallery_2", "probe_1", "probe_2"]
  assert set(source.test_sets["probe_2"].labels.tolist()) == {int(s) for s in FOLDS[2][1]}
  with pytest.raises(ValueError, match="--config.data.root=/path/to/NIR-VIS-2.0"):
    sources.load_source(_config(""), "/unused")
  config = _config(casia_root)
  config.data.fold = 0
  with pytest.raises(ValueError, match="config.data.fold"):
    sources.load_source(config, "/unused")
  assert isinstance(config.evals.face_folds, tuple) and isinstance(config, ml_collections.ConfigDict)
