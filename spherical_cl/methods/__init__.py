"""Incremental learners, by the name the config's ``method`` key uses."""

from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext
from spherical_cl.methods.drs_sphere import HypersphericalDRS
from spherical_cl.methods.linear_drs import LinearDRS
from spherical_cl.methods.ncm import NearestClassMean
from spherical_cl.methods.seq_lora import SequentialLoRA

LEARNERS = {
    learner.name: learner for learner in (NearestClassMean, SequentialLoRA, LinearDRS, HypersphericalDRS)
}


def build_learner(config, backbone):
    """Return the learner named by ``config.method`` on ``backbone``."""
    return LEARNERS[config.method](config, backbone)


__all__ = ["LEARNERS", "HypersphericalDRS", "LinearDRS", "LossOutput", "NearestClassMean", "SequentialLoRA",
           "StepInfo", "TaskContext", "build_learner"]
