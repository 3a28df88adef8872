"""Bad configs, data files, checkpoints and run directories give one clear error each."""

import json

import numpy as np
import pytest
from PIL import Image

from spherical_cl.ablate import read_finished_run
from spherical_cl.backbones import build_backbone
from spherical_cl.config import config_hash, load_config
from spherical_cl.data import IncrementalData, build_class_split, load_source
from spherical_cl.errors import BackboneError, ConfigError, DataError, RunDirError
from spherical_cl.methods import build_learner
from spherical_cl.results import prepare_run_dir


@pytest.mark.parametrize(
    "content, fragment",
    [
        (b"\xff\xfe bad\n", "not UTF-8"),
        (b"train:\n  lr: ${oc.env:HOME}\n", "cannot resolve config value train.lr"),
        (b"train: 5\n", "sections such as 'train' must be mappings"),
        (b"train: {lr: [1, \n", "line 2"),
    ],
)
def test_config_file_errors(tmp_path, content, fragment):
    path = tmp_path / "config.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_config_path_directory_and_list_element(tmp_path):
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match=r"data.class_list\[0\].*expected int"):
        load_config(None, ["data.class_list=[a,b]"])
    with pytest.raises(ConfigError, match="seed is out of range"):
        load_config(None, ["seed=-1"])


def _write_npz(root, x, y):
    root.mkdir(exist_ok=True)
    np.savez(root / "train.npz", x=x, y=y)
    np.savez(root / "test.npz", x=np.zeros((2, 4, 4, 3), np.uint8), y=np.array([0, 1]))


@pytest.mark.parametrize(
    "x, y, fragment",
    [
        (np.zeros((0, 4, 4, 3), np.uint8), np.zeros(0, np.int64), "no images"),
        (np.zeros((2, 0, 0, 3), np.uint8), np.array([0, 1]), "size 0x0"),
        (np.zeros((3, 4, 4, 3), np.uint8), np.array([0, 1, 10**9]), "labels go up to 1000000000"),
    ],
)
def test_npz_content_errors(tmp_path, x, y, fragment):
    _write_npz(tmp_path / "npz", x, y)
    with pytest.raises(DataError) as caught:
        load_source("npz", str(tmp_path / "npz"))
    assert fragment in str(caught.value)


def test_npz_that_is_not_an_archive(tmp_path):
    root = tmp_path / "npz"
    root.mkdir()
    (root / "train.npz").write_bytes(b"not a zip file")
    (root / "test.npz").write_bytes(b"not a zip file")
    with pytest.raises(DataError) as caught:
        load_source("npz", str(root))
    assert "as an .npz archive" in str(caught.value)
    assert "allow_pickle" not in str(caught.value)


def _image_folder(root, count: int = 4):
    lines = []
    for index in range(count):
        Image.fromarray(np.full((4, 4, 3), index % 255, np.uint8)).save(root / f"img_{index}.png")
        lines.append(f"img_{index}.png {index % 2}")
    (root / "train.txt").write_text("\n".join(lines) + "\n")
    (root / "test.txt").write_text("\n".join(lines[:2]) + "\n")


def test_imagefolder_label_and_encoding_errors(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "test.txt").write_text("img_0.png \u00b2\n")
    with pytest.raises(DataError, match="integer label"):
        load_source("imagefolder", str(tmp_path))
    (tmp_path / "test.txt").write_bytes("img_0.png 0 caf\u00e9\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_source("imagefolder", str(tmp_path))


def test_imagefolder_checks_every_path(tmp_path):
    _image_folder(tmp_path, count=1100)
    (tmp_path / "img_1050.png").unlink()
    with pytest.raises(DataError, match=r"'img_1050.png' not found .*\(1 of 1100 missing\)"):
        load_source("imagefolder", str(tmp_path))


def test_undecodable_image_names_the_file(tmp_path):
    _image_folder(tmp_path)
    (tmp_path / "img_2.png").write_bytes(b"not an image")
    splits = load_source("imagefolder", str(tmp_path))
    data = IncrementalData(splits, build_class_split(2, num_tasks=1), input_size=8)
    dataset = data.train_set(0, augment=False)
    with pytest.raises(DataError, match="img_2.png"):
        [dataset[i] for i in range(len(dataset))]


def test_checkpoint_and_weights_errors(tmp_path):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage")
    with pytest.raises(BackboneError) as caught:
        build_backbone("resnet18", pretrained=False, checkpoint=str(garbage))
    assert "cannot load model.checkpoint" in str(caught.value)
    assert "\n" not in str(caught.value)
    with pytest.raises(BackboneError, match="has no pretrained weights"):
        build_backbone("vit_micro", pretrained=True)


def test_lora_targets_checked_when_learner_is_built():
    config = load_config(None, ["model.pretrained=false", "model.lora_targets=[nonexistent]"])
    backbone = build_backbone("vit_micro", pretrained=False)
    with pytest.raises(ConfigError, match=r"\['nonexistent'\] matches no module.*qkv"):
        build_learner(config, backbone)


def test_new_run_removes_stale_outputs(tmp_path):
    run = tmp_path / "run"
    (run / "exports").mkdir(parents=True)
    (run / "exports" / "task_02_prototypes.safetensors").write_bytes(b"old")
    (run / "log.jsonl").write_text('{"type": "task"}\n')
    prepare_run_dir(run)
    assert not (run / "log.jsonl").exists()
    assert not (run / "exports").exists()
    (run / "metrics.json").write_text("{}")
    with pytest.raises(RunDirError, match="already contains a finished run"):
        prepare_run_dir(run)
    prepare_run_dir(run, overwrite=True)
    assert not (run / "metrics.json").exists()


def test_ablation_rejects_foreign_or_broken_cached_runs(tmp_path):
    config = load_config(None, ["model.pretrained=false"])
    run = tmp_path / "row-0" / "seed-0"
    run.mkdir(parents=True)
    assert read_finished_run(run, config) is None
    metrics = {"final_acc": 1.0, "avg_acc": 2.0, "acc_per_task": [1.0], "runtime_s": [1.0]}
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "run_info.json").write_text(json.dumps({"config_hash": config_hash(config)}))
    assert read_finished_run(run, config) == metrics
    other = load_config(None, ["model.pretrained=false", "data.num_tasks=2"])
    with pytest.raises(RunDirError, match="different config"):
        read_finished_run(run, other)
    (run / "metrics.json").write_text("{truncated")
    with pytest.raises(RunDirError, match="cannot reuse"):
        read_finished_run(run, config)
