"""Named experiments (``bnlab run NAME``): the seed's explanations, each measured.

=================  ==========================================================================
noise              mini-batch mean/variance against the population's, by batch size
ics                Ioffe & Szegedy's Figure 1: accuracy and sigmoid-input percentiles
regularization     generalization gap: plain, BN, ghost BN, BN without batch noise
init-sweep         BN vs plain over 16 initial weight scales (Deep Learning from Scratch 6.3)
lr-sweep           BN vs plain over learning rates spanning three orders of magnitude
smoothness         loss and gradient along the gradient direction (Santurkar et al. 2018)
=================  ==========================================================================
"""

from . import ics, noise, regularization, smoothness, sweeps  # noqa: F401  (registration)
from .base import EXPERIMENTS, Experiment, ExperimentConfig, UnitStore, run_experiment

__all__ = ["EXPERIMENTS", "Experiment", "ExperimentConfig", "UnitStore", "run_experiment"]
