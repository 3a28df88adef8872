"""The typed experiment config: dataclass schema, YAML loading, overrides and validation.

Every key is a dataclass field with a type, a default and a one-line help in its metadata.
OmegaConf checks keys and types while merging the YAML file and the command-line overrides
onto the schema. Ranges and choices, also declared in the metadata, are checked afterwards
by :func:`validate`. Every failure is a :class:`~spherical_cl.errors.ConfigError` whose
message names the key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from spherical_cl.errors import ConfigError


def option(
    default: Any = MISSING,
    help: str = "",
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    lt: float | None = None,
    choices: Sequence[str] | None = None,
    default_factory: Any = None,
) -> Any:
    """Declare a config field with its help text and its allowed range or choices."""
    metadata = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt, "choices": choices}
    if default_factory is not None:
        return field(default_factory=default_factory, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class ModelConfig:
    backbone: str = option(
        "vit_micro",
        "Backbone alias from spherical_cl.backbones.BACKBONES, or 'timm:NAME' / 'torchvision:NAME'.",
    )
    pretrained: bool = option(True, "Load pretrained weights (timm: Hugging Face hub; torchvision: TORCH_HOME).")
    checkpoint: Optional[str] = option(None, "Local weights file used instead of downloading pretrained weights.")
    img_size: Optional[int] = option(None, "Input resolution in pixels; default from the backbone's pretrained config.", ge=8)
    lora_rank: int = option(8, "LoRA rank r of each task's adapter.", ge=1)
    lora_alpha: float = option(8.0, "LoRA alpha; the update is scaled by alpha / r.", gt=0)
    lora_dropout: float = option(0.0, "Dropout on the LoRA input.", ge=0, lt=1)
    lora_targets: Optional[list[str]] = option(
        None, "Module names or suffixes that get adapters; default from the backbone table."
    )


@dataclass
class DataConfig:
    source: str = option(
        "digits", "Dataset source.", choices=("digits", "npz", "cifar100", "imagefolder")
    )
    root: Optional[str] = option(
        None, "Dataset directory: npz holds train.npz/test.npz; cifar100 is torchvision's root; imagefolder holds the images."
    )
    train_list: str = option("train.txt", "imagefolder: split file of 'relative/path label' lines, relative to root.")
    test_list: str = option("test.txt", "imagefolder: split file of the test images, relative to root.")
    download: bool = option(False, "cifar100: let torchvision download the dataset into root.")
    num_tasks: Optional[int] = option(5, "Number of tasks; set this or classes_per_task.", ge=1)
    classes_per_task: Optional[int] = option(None, "Classes per task; overrides num_tasks when set.", ge=1)
    first_task_classes: Optional[int] = option(None, "Classes in the first task when it is larger than the others.", ge=1)
    remainder: str = option(
        "error", "What to do with classes that do not divide into the tasks.", choices=("error", "first", "last")
    )
    class_order: str = option(
        "permutation", "Class order across tasks.", choices=("identity", "permutation", "explicit")
    )
    class_list: Optional[list[int]] = option(None, "Explicit class order when class_order is 'explicit'.")
    order_seed: int = option(1993, "Seed of the class permutation, independent of the training seed.", ge=0, lt=2**32)
    max_train_per_class: Optional[int] = option(
        None, "Cap on training images per class (seeded subset), for quick proxies.", ge=1
    )
    augment: str = option(
        "pad_crop_flip", "Training augmentation.", choices=("none", "flip", "pad_crop_flip", "random_resized_crop_flip")
    )
    num_workers: int = option(0, "DataLoader worker processes.", ge=0)


@dataclass
class TrainConfig:
    epochs_warm: int = option(0, "Warm-up epochs per task.", ge=0)
    epochs_main: int = option(2, "Main-phase epochs per task.", ge=0)
    batch_size: int = option(64, "Global training batch size (split over the ranks of a distributed run).", ge=1)
    eval_batch_size: int = option(256, "Batch size per rank of evaluation and feature passes.", ge=1)
    lr: float = option(1e-3, "Learning rate of the LoRA adapters.", gt=0)
    head_lr: Optional[float] = option(None, "Learning rate of the classifier head; default lr.", gt=0)
    wd: float = option(1e-5, "Weight decay of the LoRA adapters.", ge=0)
    lr_schedule: str = option(
        "constant", "Learning rate within each task: 'constant', or 'cosine' decay per step to lr_min.",
        choices=("constant", "cosine")
    )
    lr_min: float = option(0.0, "Final learning rate of the cosine schedule.", ge=0)
    ema_momentum: float = option(0.97, "EMA momentum beta of the class prototypes.", ge=0, lt=1)
    grad_clip: Optional[float] = option(None, "Clip the gradient norm of the trainable parameters to this value.", gt=0)
    device: str = option("auto", "'auto' (CUDA, then CPU), 'cpu', 'cuda' or 'cuda:N'.")
    precision: str = option(
        "auto", "Backbone precision: 'auto' (bfloat16 autocast on GPUs that support it, else float32), 'fp32' or "
        "'bf16'. Geometry, statistics and losses stay in float32.", choices=("auto", "fp32", "bf16")
    )
    compile: bool = option(False, "Compile the backbone with torch.compile (recompiles once per task).")
    deterministic: bool = option(
        False, "Use only deterministic CUDA kernels (slower; CPU runs are deterministic without it)."
    )


@dataclass
class PrototypeConfig:
    mode: str = option(
        "per_class", "Base points of the projection: one per class, one per task, k-means anchors, or auto.",
        choices=("per_class", "global", "multi_anchor", "auto"),
    )
    num_anchors: int = option(4, "Spherical k-means anchors per task in multi_anchor mode.", ge=1)
    min_per_class: int = option(20, "auto: per_class when every class has this many samples, else multi_anchor.", ge=1)
    ema: bool = option(True, "Update the base points by EMA of the batch embeddings (momentum train.ema_momentum).")


@dataclass
class ProjectionConfig:
    enabled: bool = option(True, "Project the embedding gradient onto the tangent space at the base point.")
    use_U: bool = option(True, "Project the embedding gradient onto the tangent PCA basis U_t too.")
    pca_energy: float = option(0.90, "Energy fraction tau that U_t must capture.", gt=0, le=1)
    k_max: int = option(128, "Maximum rank k of U_t.", ge=1)
    max_vectors: int = option(50_000, "Cap on the samples forwarded to build the drift-resistant space (seeded).", ge=1)


@dataclass
class LossConfig:
    s_start: float = option(10.0, "ArcFace scale s at the first epoch.", gt=0)
    s_end: float = option(30.0, "ArcFace scale s at the last epoch.", gt=0)
    m_start: float = option(0.0, "ArcFace additive angular margin m (radians) at the first epoch.", ge=0, lt=math.pi)
    m_end: float = option(0.2, "ArcFace margin m (radians) at the last epoch.", ge=0, lt=math.pi)
    triplet_lambda: float = option(0.5, "Weight of the angular triplet loss.", ge=0)
    triplet_margin: float = option(0.2, "Margin of the angular triplet loss (radians).", ge=0)
    label_smoothing: float = option(0.05, "Label smoothing of the cross-entropy in the warm-up phase.", ge=0, lt=1)
    anneal: str = option("linear", "Schedule of s and m over the task's epochs; 'none' fixes them at s_end, m_end.",
                         choices=("linear", "cosine", "none"))
    ce_classes: str = option("current", "Classes in the cross-entropy: the current task's or all seen.",
                             choices=("current", "seen"))
    triplet_distance: str = option("geodesic", "Distance of the triplet loss on unit embeddings.",
                                   choices=("geodesic", "chordal"))


@dataclass
class LinearDRSConfig:
    energy: float = option(0.99, "Cumulative eigenvalue energy that splits each layer's input space.", gt=0, le=1)
    subspace: str = option(
        "nullspace", "Project updates onto the eigenvectors past the energy split (nullspace) or up to it (principal).",
        choices=("nullspace", "principal"),
    )
    normalize_projector: bool = option(True, "Divide the projector by its Frobenius norm, as the published code does.")
    project_B: bool = option(True, "Also project B's update on the left (per d_in block of its rows).")
    kv_only: bool = option(False, "Adapt only the key and value blocks of a fused qkv layer (q rows of B stay 0).")


@dataclass
class VAEConfig:
    enabled: bool = option(
        False, "Add the spCauchy-VAE head (ablation row 7): head, triplet, prototypes and projection use its latent."
    )
    # The tangent PCA of the latent keeps a k x k float64 matrix, so k is capped.
    latent_dim: int = option(64, "Size k of the latent, a unit vector in R^k.", ge=2, le=4096)
    hidden_dim: int = option(256, "Width of the hidden layer of the encoder and of the decoder.", ge=1)
    beta: float = option(0.01, "Weight beta of the VAE terms: loss += beta * (reconstruction + KL).", ge=0)
    lr: float = option(1e-3, "Learning rate of the encoder and decoder, separate from train.lr.", gt=0)


@dataclass
class EvalConfig:
    headline: str = option("ncm", "Predictor reported as the headline in metrics.json.", choices=("ncm", "classifier"))
    drift_samples_per_class: Optional[int] = option(
        100, "Training images per old class used to measure geodesic drift (seeded; null: all, 0: off).", ge=0
    )


@dataclass
class LoggingConfig:
    eval_interval: int = option(1, "Evaluate on the seen classes every N epochs (0: only at each task's end).", ge=0)
    save_prototypes: bool = option(True, "Export the class prototypes after each task.")
    save_U: bool = option(True, "Export each task's basis U_t.")
    progress: bool = option(True, "Show progress bars over epochs and batches.")
    checkpoints: bool = option(True, "Write a checkpoint after each task to RUN_DIR/checkpoints (needed by --resume).")
    keep_checkpoints: int = option(0, "Keep only the newest N task checkpoints (0: keep every task's).", ge=0)


@dataclass
class ExperimentConfig:
    seed: int = option(0, "Seed of python, numpy and torch.", ge=0, lt=2**32)
    method: str = option(
        "seq_lora", "Incremental learner.", choices=("ncm", "seq_lora", "linear_drs", "drs_sphere")
    )
    model: ModelConfig = option(default_factory=ModelConfig)
    data: DataConfig = option(default_factory=DataConfig)
    train: TrainConfig = option(default_factory=TrainConfig)
    prototypes: PrototypeConfig = option(default_factory=PrototypeConfig)
    projection: ProjectionConfig = option(default_factory=ProjectionConfig)
    loss: LossConfig = option(default_factory=LossConfig)
    linear_drs: LinearDRSConfig = option(default_factory=LinearDRSConfig)
    vae: VAEConfig = option(default_factory=VAEConfig)
    eval: EvalConfig = option(default_factory=EvalConfig)
    logging: LoggingConfig = option(default_factory=LoggingConfig)


def load_config(path: str | Path | None, overrides: Sequence[str] = (), *,
                text: str | None = None) -> ExperimentConfig:
    """Load a YAML file (or YAML ``text``, then ``path`` only names it) and ``key=value`` overrides.

    The merged config is validated against the schema.

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or value out of range.
    """
    merged = OmegaConf.structured(ExperimentConfig)
    if text is not None:
        merged = _merge(merged, _parse_yaml_text(text, str(path)), source=str(path))
    elif path is not None:
        merged = _merge(merged, _read_yaml(Path(path)), source=str(path))
    if overrides:
        merged = _merge(merged, _parse_overrides(overrides), source="command line")
    try:
        config = OmegaConf.to_object(merged)
    except OmegaConfBaseException as error:
        # Interpolations such as ${oc.env:NAME} are resolved here.
        first_line = str(error).strip().splitlines()[0]
        raise ConfigError(f"cannot resolve config value {error.full_key or ''}: {first_line}; "
                          "use plain values instead of ${...} interpolations") from None
    validate(config)
    return config


def _read_yaml(path: Path) -> DictConfig:
    if path.is_dir():
        raise ConfigError(f"config path {path} is a directory; pass a YAML file with --config")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}; pass an existing YAML file with --config")
    try:
        loaded = OmegaConf.load(path)
    except UnicodeDecodeError as error:
        raise ConfigError(f"config file {path} is not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error}; it must contain a YAML mapping of keys") from None
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        # YAML errors span several lines (problem, context, position); keep them on one.
        text = " ".join(line.strip() for line in str(error).strip().splitlines() if line.strip())
        raise ConfigError(f"cannot parse config file {path}: {text}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path} must contain a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _parse_yaml_text(text: str, source: str) -> DictConfig:
    try:
        loaded = OmegaConf.create(text)
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        line = " ".join(part.strip() for part in str(error).strip().splitlines() if part.strip())
        raise ConfigError(f"cannot parse the config of {source}: {line}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"the config of {source} must be a mapping of keys, got {type(loaded).__name__}")
    return loaded


def _parse_overrides(overrides: Sequence[str]) -> DictConfig:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(f"override {item!r} is not of the form key=value, e.g. train.lr=3e-4")
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except (yaml.YAMLError, OmegaConfBaseException) as error:
        raise ConfigError(f"cannot parse overrides {list(overrides)}: {error}") from error


def _merge(base: DictConfig, update: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, update)
    except ConfigKeyError as error:
        key = error.full_key or str(error.key)
        raise ConfigError(f"unknown config key {key!r} in {source}{_suggest_keys(key)}") from None
    except OmegaConfBaseException as error:
        key = error.full_key or (str(error.key) if error.key is not None else "")
        if not key:
            first_line = str(error).strip().splitlines()[0]
            raise ConfigError(f"invalid config in {source}: {first_line}; sections such as 'train' must be mappings"
                              ) from None
        expected = _expected_type(key)
        raise ConfigError(
            f"invalid value {error.value!r} for {key} in {source}: expected {expected}"
        ) from None


def _resolve_type(owner: type, name: str) -> Any:
    return typing.get_type_hints(owner)[name]


def _expected_type(dotted_key: str) -> str:
    owner: Any = ExperimentConfig
    # A list element such as "data.class_list[0]" has the element type of the list.
    element = dotted_key.endswith("]")
    dotted_key = re.sub(r"\[\d+\]$", "", dotted_key)
    try:
        for part in dotted_key.split("."):
            annotation = _resolve_type(owner, part)
            owner = annotation
    except (KeyError, TypeError):
        return "a value of the schema's type"
    if element:
        arguments = [a for a in typing.get_args(annotation) if a is not type(None)]
        lists = [a for a in arguments if typing.get_origin(a) is list] or [annotation]
        inner = typing.get_args(lists[0])
        if inner:
            return _type_name(inner[0])
    return _type_name(annotation)


def _type_name(annotation: Any) -> str:
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    if typing.get_origin(annotation) is list:
        return f"a list of {_type_name(args[0])}"
    return getattr(annotation, "__name__", str(annotation))


def _suggest_keys(dotted_key: str) -> str:
    parent_key, _, name = dotted_key.rpartition(".")
    owner: Any = ExperimentConfig
    for part in filter(None, parent_key.split(".")):
        try:
            owner = _resolve_type(owner, part)
        except KeyError:
            return ""
    if not dataclasses.is_dataclass(owner):
        return ""
    valid = [f.name for f in dataclasses.fields(owner)]
    prefix = f"{parent_key}." if parent_key else ""
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    if close:
        return "; did you mean " + " or ".join(repr(prefix + c) for c in close) + "?"
    return f"; valid keys here: {', '.join(prefix + v for v in valid)}"


def iter_fields(config: Any, prefix: str = ""):
    """Yield ``(dotted_key, value, field)`` for every leaf of a config dataclass."""
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from iter_fields(value, prefix=f"{key}.")
        else:
            yield key, value, f


def validate(config: ExperimentConfig) -> None:
    """Check every declared range and choice, then the constraints between keys.

    Raises:
        ConfigError: names the first offending key, its value and what is allowed.
    """
    for key, value, f in iter_fields(config):
        _check_field(key, value, f.metadata)
    _check_cross_field(config)


def _check_field(key: str, value: Any, meta: Any) -> None:
    if value is None:
        return
    choices = meta.get("choices")
    if choices is not None and value not in choices:
        close = difflib.get_close_matches(str(value), list(choices), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"invalid value {value!r} for {key}: must be one of {', '.join(choices)}{hint}")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"invalid value {value!r} for {key}: must be a finite number")
    bounds = [
        ("ge", lambda v, b: v >= b, ">="),
        ("gt", lambda v, b: v > b, ">"),
        ("le", lambda v, b: v <= b, "<="),
        ("lt", lambda v, b: v < b, "<"),
    ]
    for name, holds, symbol in bounds:
        bound = meta.get(name)
        if bound is not None and not holds(value, bound):
            raise ConfigError(f"value {value!r} for {key} is out of range: must be {symbol} {bound:g}")


def _check_cross_field(config: ExperimentConfig) -> None:
    data = config.data
    if data.class_order == "explicit" and not data.class_list:
        raise ConfigError("data.class_order is 'explicit' but data.class_list is empty; give the class order as a list")
    if data.class_list and data.class_order != "explicit":
        raise ConfigError(
            f"data.class_list is set but data.class_order is {data.class_order!r}; set data.class_order=explicit"
        )
    if data.num_tasks is None and data.classes_per_task is None:
        raise ConfigError("set data.num_tasks or data.classes_per_task")
    if data.source in ("npz", "imagefolder") and not data.root:
        raise ConfigError(f"data.root is required for data.source={data.source!r}; set it to the dataset directory")
    if config.train.epochs_warm + config.train.epochs_main == 0 and config.method != "ncm":
        raise ConfigError("train.epochs_warm + train.epochs_main is 0; train for at least one epoch")
    _check_vae(config)


def _check_vae(config: ExperimentConfig) -> None:
    vae, projection = config.vae, config.projection
    if not vae.enabled:
        return
    if config.method != "drs_sphere":
        raise ConfigError(f"vae.enabled=true needs method=drs_sphere, got method={config.method!r}; "
                          "set method=drs_sphere or vae.enabled=false")
    if projection.use_U and projection.k_max >= vae.latent_dim:
        raise ConfigError(
            f"projection.k_max={projection.k_max} must be smaller than vae.latent_dim={vae.latent_dim}, because "
            f"U_t lives in a tangent space of the latent sphere, of dimension {vae.latent_dim - 1}; lower "
            "projection.k_max or raise vae.latent_dim"
        )


def to_dict(config: ExperimentConfig) -> dict:
    """Return the config as plain nested dicts, lists and scalars."""
    return dataclasses.asdict(config)


def to_yaml(config: ExperimentConfig) -> str:
    """Return the resolved config as YAML text that :func:`load_config` reads back."""
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_hash(config: ExperimentConfig) -> str:
    """Return a SHA-256 hex digest of the resolved config, independent of key order."""
    text = json.dumps(to_dict(config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


# Keys a resumed run may not change, even with --force: the saved tasks depend on them.
# The seed sets randomly initialised backbone weights, which checkpoints do not store, and
# the drift references of finished tasks were measured with eval.drift_samples_per_class.
RESUME_FIXED_KEYS = ("seed", "method", "model.", "data.", "vae.enabled", "vae.latent_dim", "vae.hidden_dim",
                     "eval.drift_samples_per_class")
# Keys under data. that set only where the data is read from and how fast.
RESUME_FREE_DATA_KEYS = ("data.root", "data.download", "data.num_workers")


def flatten_dict(nested: dict, prefix: str = "") -> dict[str, Any]:
    """Return ``{dotted_key: value}`` for every leaf of nested dicts."""
    flat = {}
    for key, value in nested.items():
        if isinstance(value, dict):
            flat.update(flatten_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def diff_configs(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """Return ``(dotted_key, old value, new value)`` for every key whose value differs, sorted by key.

    A key present on one side only appears with ``None`` on the other.
    """
    old_flat, new_flat = flatten_dict(old), flatten_dict(new)
    return [(key, old_flat.get(key), new_flat.get(key)) for key in sorted(old_flat.keys() | new_flat.keys())
            if old_flat.get(key) != new_flat.get(key)]


def is_resume_fixed(key: str) -> bool:
    """Return whether a resumed run must keep ``key`` as the checkpoint has it."""
    if key in RESUME_FREE_DATA_KEYS:
        return False
    return any(key == fixed or (fixed.endswith(".") and key.startswith(fixed)) for fixed in RESUME_FIXED_KEYS)


def describe_keys() -> list[tuple[str, str, str]]:
    """Return ``(dotted_key, default, help)`` for every key, for ``--list-keys``."""
    rows = []
    for key, value, f in iter_fields(ExperimentConfig()):
        rows.append((key, repr(value), f.metadata.get("help", "")))
    return rows
