"""Incremental learners, by the name the config's ``method`` key uses."""

from spherical_cl.methods.base import LossOutput, StepInfo, TaskContext
from spherical_cl.methods.seq_lora import SequentialLoRA

LEARNERS = {
    SequentialLoRA.name: SequentialLoRA,
}


def build_learner(config, backbone):
    """Return the learner named by ``config.method`` on ``backbone``."""
    return LEARNERS[config.method](config, backbone)


__all__ = ["LEARNERS", "LossOutput", "SequentialLoRA", "StepInfo", "TaskContext", "build_learner"]
