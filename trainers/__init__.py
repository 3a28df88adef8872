"""Training loops that drive the learners of :mod:`spherical_cl.methods`."""

from trainers.incremental import IncrementalTrainer, NonFiniteLossError, resolve_device, seed_everything
from trainers.experiment import run_experiment, plan_experiment

__all__ = ["IncrementalTrainer", "NonFiniteLossError", "plan_experiment", "resolve_device", "run_experiment",
           "seed_everything"]
