"""The rows of the ablation matrix as named presets of ordinary config keys.

Each row is a list of ``key=value`` overrides applied on top of the user's config, so any
row can also be run alone with ``python -m spherical_cl.train``. Rows that switch the
warm-up off move its epochs into the main phase, so every row trains the same number of
epochs as the base config.
"""

from __future__ import annotations

from spherical_cl.config import ExperimentConfig
from spherical_cl.errors import ConfigError

ROW_DESCRIPTIONS = {
    "ncm": "frozen nearest class mean (SimpleCIL)",
    "0": "sequential LoRA, no drift control",
    "1": "linear DRS (LoRA⁻ as published)",
    "2": "Riemannian projection only",
    "3": "2 + tangent PCA basis U_t",
    "4": "3 + angular triplet",
    "5": "4 + EMA prototypes",
    "6": "5 + warm-up and s, m annealing",
    "7": "6 + spCauchy-VAE head",
}
ROW_ORDER = list(ROW_DESCRIPTIONS)


def row_overrides(row: str, base: ExperimentConfig) -> list[str]:
    """Return the overrides that turn ``base`` into ablation row ``row``.

    Every row but 7 switches the spCauchy-VAE head off, so a base config with the head on
    (such as ``configs/demo_row7.yaml``) still gives the rows without it.

    Raises:
        ConfigError: unknown row.
    """
    if row not in ROW_DESCRIPTIONS:
        raise ConfigError(f"unknown ablation row {row!r}; rows are {', '.join(ROW_ORDER)}")
    epochs = base.train.epochs_warm + base.train.epochs_main
    no_warmup = ["train.epochs_warm=0", f"train.epochs_main={epochs}"]
    no_head = ["vae.enabled=false"]
    if row == "ncm":
        return ["method=ncm", "eval.headline=ncm", *no_head]
    if row == "0":
        return ["method=seq_lora", *no_warmup, *no_head]
    if row == "1":
        return ["method=linear_drs", *no_warmup, "loss.triplet_distance=chordal", *no_head]
    riemannian_only = ["method=drs_sphere", *no_warmup, "projection.enabled=true", "projection.use_U=false",
                       "loss.anneal=none", "prototypes.ema=false", "loss.triplet_lambda=0", *no_head]
    triplet = [f"loss.triplet_lambda={base.loss.triplet_lambda or 0.5}"]
    steps = {
        "2": riemannian_only,
        "3": [*riemannian_only, "projection.use_U=true"],
        "4": [*riemannian_only, "projection.use_U=true", *triplet],
        "5": [*riemannian_only, "projection.use_U=true", *triplet, "prototypes.ema=true"],
        "6": [*riemannian_only, "projection.use_U=true", *triplet, "prototypes.ema=true",
              f"train.epochs_warm={base.train.epochs_warm}", f"train.epochs_main={base.train.epochs_main}",
              f"loss.anneal={base.loss.anneal if base.loss.anneal != 'none' else 'linear'}"],
    }
    steps["7"] = [*(item for item in steps["6"] if item not in no_head), "vae.enabled=true"]
    return steps[row]


def parse_rows(text: str) -> list[str]:
    """Parse a row list such as ``ncm,0-6`` or ``1,3,5`` into row names in the given order.

    Raises:
        ConfigError: a malformed range or an unknown row.
    """
    rows: list[str] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "-" in part:
            first, _, last = part.partition("-")
            numbered = [row for row in ROW_ORDER if row.isdigit()]
            if first not in numbered or last not in numbered or int(first) > int(last):
                raise ConfigError(f"invalid row range {part!r}; write it as e.g. 0-6 with rows "
                                  f"{numbered[0]} to {numbered[-1]}")
            rows += [str(r) for r in range(int(first), int(last) + 1)]
        else:
            rows.append(part)
    unknown = [r for r in rows if r not in ROW_DESCRIPTIONS]
    if unknown:
        raise ConfigError(f"unknown ablation rows {unknown}; rows are {', '.join(ROW_ORDER)}")
    if not rows:
        raise ConfigError(f"no ablation rows in {text!r}; give e.g. --rows ncm,0-6")
    return list(dict.fromkeys(rows))
