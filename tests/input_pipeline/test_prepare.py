"""input_pipeline.prepare: a build that stops leaves no empty folders under --data_dir (and keeps what was there)."""

import os

from input_pipeline import prepare
from tests.input_pipeline import test_sysu


def _folders(root):
  return sorted(os.path.relpath(d, root) for d, _, _ in os.walk(root))


def test_a_failed_build_leaves_no_empty_folders(tmp_path, capsys):
  root = test_sysu.write_tree(tmp_path / "SYSU-MM01")
  open(os.path.join(root, "cam1", "0001", "0007.jpg"), "wb").close()  # the build stops at this empty image.
  data_dir = tmp_path / "tfds"
  assert prepare.main(["--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={data_dir}"]) == 1
  assert "0007.jpg is empty (0 bytes)" in capsys.readouterr().err
  assert not data_dir.exists()  # the build made it, and everything in it was an empty folder.
  # A data_dir that was there already (with another data set's folder, an empty one included) keeps all of it.
  (data_dir / "other_set" / "1.0.0").mkdir(parents=True)
  (data_dir / "other_set" / "1.0.0" / "dataset_info.json").write_text("{}")
  (data_dir / "empty_but_ours").mkdir()
  before = _folders(data_dir)
  assert prepare.main(["--dataset=sysu_mm01", f"--manual_dir={root}", f"--data_dir={data_dir}"]) == 1
  assert _folders(data_dir) == before
  assert (data_dir / "other_set" / "1.0.0" / "dataset_info.json").read_text() == "{}"


def test_help_exits_0(capsys):
  try:
    prepare.main(["--help"])
  except SystemExit as e:
    assert e.code == 0
  assert "--skip_corrupt" in capsys.readouterr().out
