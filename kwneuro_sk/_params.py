"""Parameter constraints shared by the public estimators and functions (scikit-learn's
``_parameter_constraints`` / ``validate_params`` format), and the checks that go with them."""

import os
from numbers import Integral

from sklearn.utils import validation
from sklearn.utils._param_validation import HasMethods, Interval

# joblib's n_jobs: a positive count, a negative one counted back from the number of cores
# (-1: all), or None (one, unless a joblib.parallel_config context says otherwise); never 0.
N_JOBS = [
    Interval(Integral, None, -1, closed="right"),
    Interval(Integral, 1, None, closed="left"),
    None,
]

# A joblib cache: a folder (str or path-like), a joblib.Memory, or None (no cache).
MEMORY = [str, os.PathLike, HasMethods(["cache"]), None]


def check_memory(memory):
    """scikit-learn's ``check_memory``, also for a path-like folder (it takes str only)."""
    return validation.check_memory(os.fspath(memory) if isinstance(memory, os.PathLike) else memory)
