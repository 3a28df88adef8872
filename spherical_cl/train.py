"""Command line: ``python -m spherical_cl.train --config FILE [key=value ...]``.

This module and :mod:`spherical_cl.ablate` are the entry points. They are the only modules
of ``spherical_cl`` that import ``trainers``; the library itself never does.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

from spherical_cl.cli import configure_logging, run_reporting_input_errors
from spherical_cl.errors import RunDirError

logger = logging.getLogger("spherical_cl.train")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m spherical_cl.train",
        description="Train a class-incremental experiment task by task and write its results.",
    )
    parser.add_argument("--config", help="YAML experiment config (required unless --list-keys).")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="Config overrides in dotted form, e.g. train.lr=3e-4 data.num_tasks=20.")
    parser.add_argument("--list-keys", action="store_true",
                        help="Print every config key with its default and help, then exit.")
    parser.add_argument("--run-dir", default=None,
                        help="Output directory (default: runs/<config name>-<date>-<time>).")
    parser.add_argument("--dry-run", action="store_true",
                        help="Validate the config, build the task split and print the plan; load no weights.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace the results and checkpoints of an earlier run in --run-dir.")
    parser.add_argument("--resume", metavar="RUN_DIR", default=None,
                        help="Continue the run in RUN_DIR after its last complete task. Its own config is used "
                             "unless --config is given; overrides that change it need --force.")
    parser.add_argument("--force", action="store_true",
                        help="With --resume: accept a config that differs from the run's (not in the method, "
                             "model, data split or VAE size).")
    parser.add_argument("--log-level", default="INFO", choices=("DEBUG", "INFO", "WARNING", "ERROR"),
                        help="Logging level of the console.")
    parser.add_argument("--debug", action="store_true", help="Show the traceback of input errors.")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the process exit code."""
    parser = build_parser()
    args = parser.parse_intermixed_args(argv)
    if args.list_keys:
        from spherical_cl.config import describe_keys

        for key, default, help_text in describe_keys():
            print(f"{key} = {default}\n    {help_text}")
        return 0
    if args.config is None and args.resume is None:
        parser.error("the following arguments are required: --config (or --resume RUN_DIR)")
    if args.resume is not None:
        for flag, is_set in (("--run-dir", args.run_dir is not None), ("--overwrite", args.overwrite),
                            ("--dry-run", args.dry_run)):
            if is_set:
                parser.error(f"--resume cannot be combined with {flag}; --resume names the run directory")
    elif args.force:
        parser.error("--force only applies to --resume RUN_DIR")
    configure_logging(args.log_level)
    try:
        return run_reporting_input_errors(_run, args)
    finally:
        # Loaded only once a run started; a config error exits without importing torch.
        distributed = sys.modules.get("spherical_cl.distributed")
        if distributed is not None:
            distributed.shutdown_distributed()


def _run(args: argparse.Namespace) -> int:
    from spherical_cl.config import load_config

    if args.resume is not None:
        if not args.resume.strip():
            raise RunDirError("--resume is empty; give the run directory to continue")
        if not Path(args.resume).exists():
            raise RunDirError(f"--resume {args.resume}: no such run directory")
        if not Path(args.resume).is_dir():
            raise RunDirError(f"--resume {args.resume} is not a directory; give the run directory to continue")
    if args.resume is not None and args.config is None:
        # The run's own config: that of its newest checkpoint, which needs torch to read.
        from trainers.experiment import resume_config_text

        text, source = resume_config_text(Path(args.resume))
        config = load_config(source, args.overrides, text=text)
    else:
        config = load_config(args.config, args.overrides)
    # Importing the trainer pulls in torch, timm and peft; a config error is reported before that.
    from trainers.experiment import plan_experiment, resume_experiment, run_experiment
    from trainers.incremental import NonFiniteLossError
    from spherical_cl.results import default_run_dir, summary_table

    if args.dry_run:
        print(plan_experiment(config).describe())
        return 0
    if args.run_dir is not None and not args.run_dir.strip():
        raise RunDirError("--run-dir is empty; give a directory name")
    if args.resume is not None:
        run_dir = Path(args.resume)
    else:
        run_dir = Path(args.run_dir) if args.run_dir is not None else default_run_dir(args.config)
    try:
        if args.resume is not None:
            metrics = resume_experiment(config, run_dir, force=args.force)
        else:
            metrics = run_experiment(config, run_dir, overwrite=args.overwrite)
    except NonFiniteLossError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(summary_table(metrics))
        print(f"results: {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
