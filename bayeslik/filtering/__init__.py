"""Filtering and exact inference for state-space models (pure JAX functions on arrays).

The ``method="auto"`` thresholds live in :mod:`bayeslik.filtering.hmm`
(``CPU_PARALLEL_MIN_T``, ``ACCELERATOR_PARALLEL_MIN_T``).
"""

from bayeslik.filtering.hmm import (
    FilterResult,
    SmootherResult,
    choose_method,
    hmm_filter,
    hmm_loglik,
    hmm_sample_paths,
    hmm_smoother,
    hmm_viterbi,
)
from bayeslik.filtering import kalman, particle  # noqa: E402
from bayeslik.filtering.kalman import kalman_filter, kalman_loglik  # noqa: E402
from bayeslik.filtering.particle import PFResult, StateSpaceModel, particle_filter  # noqa: E402

__all__ = [
    "kalman",
    "particle",
    "kalman_filter",
    "kalman_loglik",
    "PFResult",
    "StateSpaceModel",
    "particle_filter",
    "FilterResult",
    "SmootherResult",
    "choose_method",
    "hmm_loglik",
    "hmm_filter",
    "hmm_smoother",
    "hmm_viterbi",
    "hmm_sample_paths",
]
