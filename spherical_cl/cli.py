"""Logging set-up and the input-error exit shared by the command-line entry points."""

from __future__ import annotations

import argparse
import logging
import sys
import traceback
import warnings
from typing import Callable

from spherical_cl.errors import UserError

EXIT_USER_ERROR = 2
# The shell's code for a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130


def configure_logging(level: str) -> None:
    """Send log records of ``level`` and above to stderr with a time stamp."""
    logging.basicConfig(level=getattr(logging, level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # torch 2.14 deprecates torch.jit.script, which torchvision still calls at import time.
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)


def run_reporting_input_errors(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Return ``run(args)``, or print a UserError as one ``error:`` line and return exit code 2.

    With ``args.debug`` the traceback is printed first. Ctrl-C (SIGINT) prints one line and
    returns 130.
    """
    try:
        return run(args)
    except UserError as error:
        if args.debug:
            traceback.print_exc()
        print(f"error: {error}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        if args.debug:
            traceback.print_exc()
        print("error: interrupted; the checkpoints of finished tasks are kept, continue with --resume RUN_DIR",
              file=sys.stderr)
        return EXIT_INTERRUPTED
