import math
from pathlib import Path

import pytest

from spherical_cl.config import ExperimentConfig, config_hash, describe_keys, load_config, to_yaml
from spherical_cl.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "configs" / "sample.yaml"


def test_sample_loads_with_defaults():
    config = load_config(SAMPLE)
    assert config.seed == 1337
    assert config.model.backbone == "vit_b16_in21k"
    assert config.model.lora_rank == 16
    assert config.train.epochs_warm == 4
    assert config.train.epochs_main == 26
    assert config.projection.pca_energy == pytest.approx(0.90)
    assert config.loss.m_end == pytest.approx(0.2)
    assert config.logging.save_U is True
    assert config.data.source == "digits"
    assert config.data == ExperimentConfig().data


def test_sample_scientific_notation_is_float():
    config = load_config(SAMPLE)
    assert isinstance(config.train.lr, float)
    assert config.train.lr == pytest.approx(1e-3)
    assert config.train.wd == pytest.approx(1e-5)


def test_overrides_apply():
    config = load_config(SAMPLE, ["train.lr=3e-4", "data.num_tasks=2", "model.lora_targets=[qkv,proj]"])
    assert config.train.lr == pytest.approx(3e-4)
    assert config.data.num_tasks == 2
    assert config.model.lora_targets == ["qkv", "proj"]


@pytest.mark.parametrize(
    "override, fragments",
    [
        ("train.lrr=1", ["unknown config key 'train.lrr'", "did you mean 'train.lr'"]),
        ("trian.lr=1", ["unknown config key 'trian'", "'train'"]),
        ("train.lr=abc", ["'abc'", "train.lr", "expected float"]),
        ("train.lr=-1", ["-1.0", "train.lr", "> 0"]),
        ("projection.pca_energy=1.5", ["1.5", "projection.pca_energy", "<= 1"]),
        ("train.ema_momentum=1.0", ["train.ema_momentum", "< 1"]),
        ("data.source=npzz", ["'npzz'", "data.source", "did you mean 'npz'"]),
        ("data.num_tasks=x", ["data.num_tasks", "expected int or null"]),
        ("loss.m_end=nan", ["loss.m_end", "finite"]),
        ("nokeyvalue", ["key=value"]),
    ],
)
def test_invalid_override_message(override, fragments):
    with pytest.raises(ConfigError) as caught:
        load_config(SAMPLE, [override])
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {lr: [1, \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="data.root is required"):
        load_config(None, ["data.source=npz"])
    with pytest.raises(ConfigError, match="class_list"):
        load_config(None, ["data.class_order=explicit"])


def test_every_key_has_help():
    rows = describe_keys()
    assert len(rows) > 40
    missing = [key for key, _, help_text in rows if not help_text]
    assert missing == []


def test_yaml_round_trip_and_hash(tmp_path):
    config = load_config(SAMPLE, ["train.lr=3e-4"])
    path = tmp_path / "resolved.yaml"
    path.write_text(to_yaml(config))
    again = load_config(path)
    assert again == config
    assert config_hash(again) == config_hash(config)
    assert config_hash(load_config(SAMPLE)) != config_hash(config)
    assert math.isclose(again.train.lr, 3e-4)


@pytest.mark.parametrize(
    "key, fixed",
    [("seed", True), ("method", True), ("model.lora_rank", True), ("data.num_tasks", True), ("data.root", False),
     ("data.num_workers", False), ("vae.latent_dim", True), ("vae.beta", False), ("eval.drift_samples_per_class", True),
     ("train.lr", False), ("logging.keep_checkpoints", False)],
)
def test_resume_fixed_keys(key, fixed):
    from spherical_cl.config import is_resume_fixed

    assert is_resume_fixed(key) is fixed
