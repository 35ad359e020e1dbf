"""Parameter constraints shared by the public estimators and functions (scikit-learn's
``_parameter_constraints`` / ``validate_params`` format)."""

from numbers import Integral

from sklearn.utils._param_validation import Interval

# joblib's n_jobs: a positive count, a negative one counted back from the number of cores
# (-1: all), or None (one, unless a joblib.parallel_config context says otherwise); never 0.
N_JOBS = [
    Interval(Integral, None, -1, closed="right"),
    Interval(Integral, 1, None, closed="left"),
    None,
]
