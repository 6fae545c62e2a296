"""Unlearning engine: LMCleaner propagation, rollback and replay over a recorded trajectory."""

from lmclean.unlearn.baselines import replay, rollback
from lmclean.unlearn.common import ForgetSet, SweepResult
from lmclean.unlearn.lmcleaner import PropagationSettings, propagate
from lmclean.unlearn.operators import HVP_CHOICES, OperatorSettings
from lmclean.unlearn.trajectory import InMemoryTrajectory, StoreTrajectory, Trajectory

__all__ = ["HVP_CHOICES", "ForgetSet", "InMemoryTrajectory", "OperatorSettings", "PropagationSettings",
           "StoreTrajectory", "SweepResult", "Trajectory", "propagate", "replay", "rollback"]
