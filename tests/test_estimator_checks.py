"""scikit-learn's estimator checks for CombatHarmonizer and LabelsMasker.

The checks fit on a numeric array and nothing else. CombatHarmonizer needs the site of every
row, so the bare estimator cannot pass the checks that fit: it raises a ValueError asking for
the sites, which is what it must do. To run those checks anyway, ``_RowSiteHarmonizer`` (a
test-only subclass) derives a site from each row's own first value, so the checks see an
estimator that needs nothing but X. The site of a row depends only on that row, so the
invariance checks (sample order, subsets, one row at a time) keep their meaning. Every check
passes for it, for each option combination below.

LabelsMasker takes images (paths or nibabel images), one per row, and its tags say so: with
them scikit-learn skips every check. ``_ArrayTaggedMasker`` (test-only) is the same masker with
tags that claim 2-D array input, so that the checks run. Those about parameters, cloning,
``repr``, tags and unfitted errors pass; each check that feeds a numeric array to ``fit`` or
``transform`` is listed below with why it cannot apply.

Each expected failure is pinned: the check must fail, and the root of its exception must be our
own error of the listed type and message (the sites asked for, images asked for). A check that
starts passing, or fails for another reason, fails the test (``_run_pinned``); with
``xfail_strict`` in pyproject.toml no other xfail can pass silently either.
"""

import re
import warnings

import nibabel as nib
import numpy as np
import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from kwneuro_sk import CombatHarmonizer, LabelsMasker

_NEEDS_SITES = (
    "fits on a numeric X without sites; CombatHarmonizer must raise and ask for "
    "them (batch_col or batch=). Run with sites in _RowSiteHarmonizer."
)
# The error every bare expected failure must come from (the root of the check's exception).
_SITES_ERROR = (ValueError, r"^CombatHarmonizer needs the site of each row: set batch_col")

# Checks that fit (or fit then transform) the bare estimator on X alone: name -> (reason,
# (type, pattern) of our own error at the root of the exception the check raises).
_BARE_EXPECTED_FAILURES = {
    name: (_NEEDS_SITES, _SITES_ERROR)
    for name in [
        "check_fit_score_takes_y",
        "check_estimators_overwrite_params",
        "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self",
        "check_readonly_memmap_input",
        "check_n_features_in_after_fitting",
        "check_estimators_dtypes",
        "check_dtype_object",
        "check_pipeline_consistency",
        "check_estimators_pickle",
        "check_f_contiguous_array_estimator",
        "check_transformer_data_not_an_array",
        "check_transformer_general",
        "check_transformer_preserve_dtypes",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
        "check_dict_unchanged",
        "check_fit_idempotent",
        "check_fit_check_is_fitted",
        "check_n_features_in",
        "check_fit2d_predict1d",
    ]
}
_BARE_EXPECTED_FAILURES.update(
    {
        "check_positive_only_tag_during_fit": (
            _NEEDS_SITES + " (the missing-sites ValueError is read as a rejection of negative "
            "values)",
            _SITES_ERROR,
        ),
        "check_estimators_nan_inf": (
            _NEEDS_SITES + " (the missing sites are reported first, so the NaN message is not "
            "reached)",
            _SITES_ERROR,
        ),
        "check_fit2d_1sample": (
            _NEEDS_SITES + " (the message is about the sites, not n_samples)",
            _SITES_ERROR,
        ),
        "check_fit2d_1feature": (
            _NEEDS_SITES + " (the message is about the sites, not n_features)",
            _SITES_ERROR,
        ),
    }
)


def _check_name(check):
    return getattr(check, "func", check).__name__


def _root_error(exc):
    """The first exception of the chain: the one raised by the estimator itself when a check
    wraps it in its own AssertionError."""
    while exc.__cause__ is not None or exc.__context__ is not None:
        exc = exc.__cause__ or exc.__context__
    return exc


def _run_pinned(check, estimator, expected_failures):
    """Run a check; one listed in ``expected_failures`` must fail, and with our own error of the
    pinned type and message (otherwise this test fails), and is then reported as xfail."""
    name = _check_name(check)
    if name not in expected_failures:
        check(estimator)
        return
    reason, (error_type, pattern) = expected_failures[name]
    with pytest.raises(Exception) as info:  # noqa: B017 - any failure; its root is checked below
        check(estimator)
    root = _root_error(info.value)
    assert isinstance(root, error_type) and re.search(pattern, str(root)), (
        f"{name} failed for another reason than pinned ({reason}): {root!r}"
    )
    pytest.xfail(reason)


def _row_sites(X):
    """Site of each row from its own first value: 'even' or 'odd' floor(7.3 * x0).

    Returns None for input that is not a 2-D numeric array, so that CombatHarmonizer reports
    the problem with X itself (sparse, complex, 1-D, object, empty ...).
    """
    with warnings.catch_warnings(), np.errstate(invalid="ignore"):
        warnings.simplefilter("ignore", np.exceptions.ComplexWarning)
        try:
            x = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError):
            return None
        if x.ndim != 2 or x.shape[1] == 0:
            return None
        return np.where(np.floor(x[:, 0] * 7.3) % 2 == 0, "even", "odd")


class _RowSiteHarmonizer(CombatHarmonizer):
    """CombatHarmonizer whose sites are computed from X (test-only, for the checks)."""

    def fit(self, X, y=None):
        return super().fit(X, y, batch=_row_sites(X))

    def fit_transform(self, X, y=None):
        return super().fit_transform(X, y, batch=_row_sites(X))

    def transform(self, X):
        return super().transform(X, batch=_row_sites(X))

    def partial_fit(self, X, y=None):
        return super().partial_fit(X, y, batch=_row_sites(X))


@parametrize_with_checks([CombatHarmonizer()])
def test_bare_estimator_checks(estimator, check):
    _run_pinned(check, estimator, _BARE_EXPECTED_FAILURES)


@parametrize_with_checks(
    [
        _RowSiteHarmonizer(),
        _RowSiteHarmonizer(parametric=False),
        _RowSiteHarmonizer(eb=False),
        _RowSiteHarmonizer(mean_only=True),
        _RowSiteHarmonizer(ref_batch="even"),
    ]
)
def test_estimator_checks_with_sites(estimator, check):
    check(estimator)


def test_row_site_wrapper_is_combat_with_those_sites():
    # The wrapper adds nothing but the sites: same numbers as batch= given by hand.
    rng = np.random.default_rng(0)
    X = rng.normal(size=(60, 5)) * 3
    X[:, 1:] += np.where(_row_sites(X) == "odd", 2.0, -1.0)[:, None]
    sites = _row_sites(X)
    assert set(sites) == {"even", "odd"}
    expected = CombatHarmonizer().fit(X, batch=sites).transform(X, batch=sites)
    np.testing.assert_array_equal(_RowSiteHarmonizer().fit(X).transform(X), expected)
    # and the site offset on features 1.. is removed
    means = [expected[sites == s, 1:].mean() for s in ("even", "odd")]
    assert abs(means[0] - means[1]) < 0.5


def test_bare_estimator_asks_for_sites():
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(ValueError, match="needs the site of each row.*batch_col.*batch="):
        CombatHarmonizer().fit(X)


# ------------------------------------------------------------------------------------------
# LabelsMasker
# ------------------------------------------------------------------------------------------


class _ArrayTaggedMasker(LabelsMasker):
    """LabelsMasker whose tags claim 2-D array input, so scikit-learn runs its checks."""

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = True
        tags.input_tags.string = False
        return tags


def _tiny_atlas():
    return nib.Nifti1Image(np.arange(8, dtype=np.int16).reshape(2, 2, 2) % 3, np.eye(4))


_ARRAY_IS_NOT_IMAGES = (
    "feeds a numeric array as X; X must be images (one per row), so the "
    "masker raises a TypeError asking for images."
)
_FIT_READS_ONLY_THE_ATLAS = (
    "fit reads only labels_img and mask_img, never the subject images "
    "(X is only type-checked), so it cannot reject their values at fit."
)
_NUMERIC_ARRAY_ERROR = (TypeError, r"^X is a numeric array of shape .*; expected images")
_NOT_IMAGES_ERROR = (TypeError, r"^X must be an image or a list, tuple, 1-D array or pandas")
_SPARSE = "; the masker's TypeError asks for images rather than naming sparse input."

_MASKER_EXPECTED_FAILURES = {
    name: (_ARRAY_IS_NOT_IMAGES, _NUMERIC_ARRAY_ERROR)
    for name in [
        "check_fit_score_takes_y",
        "check_estimators_overwrite_params",
        "check_dont_overwrite_parameters",
        "check_estimators_fit_returns_self",
        "check_readonly_memmap_input",
        "check_n_features_in_after_fitting",
        "check_estimators_dtypes",
        "check_complex_data",
        "check_pipeline_consistency",
        "check_estimators_pickle",
        "check_f_contiguous_array_estimator",
        "check_transformer_general",
        "check_transformer_preserve_dtypes",
        "check_methods_sample_order_invariance",
        "check_methods_subset_invariance",
        "check_fit2d_1sample",
        "check_fit2d_1feature",
        "check_dict_unchanged",
        "check_fit_idempotent",
        "check_fit_check_is_fitted",
        "check_n_features_in",
        "check_fit1d",
        "check_fit2d_predict1d",
    ]
}
_MASKER_EXPECTED_FAILURES.update(
    {
        "check_dtype_object": (
            "feeds a 2-D object array; X must be a 1-D collection of images, so the masker "
            "raises a ValueError about its shape.",
            (ValueError, r"^X must be a 1-D collection of images, got shape"),
        ),
        "check_transformer_data_not_an_array": (
            "feeds an array-like wrapper of numbers; X must be images, so the masker raises a "
            "TypeError.",
            (TypeError, _NOT_IMAGES_ERROR[1] + r".*got _NotAnArray"),
        ),
        "check_positive_only_tag_during_fit": (
            _ARRAY_IS_NOT_IMAGES + " (read by the check as a rejection of negative values)",
            _NUMERIC_ARRAY_ERROR,
        ),
        "check_estimator_sparse_tag": (
            "feeds a sparse array" + _SPARSE,
            (TypeError, _NOT_IMAGES_ERROR[1] + r".*got csr_array"),
        ),
        "check_estimator_sparse_array": (
            "feeds a sparse array" + _SPARSE,
            (TypeError, _NOT_IMAGES_ERROR[1] + r".*got csr_array"),
        ),
        "check_estimator_sparse_matrix": (
            "feeds a sparse matrix" + _SPARSE,
            (TypeError, _NOT_IMAGES_ERROR[1] + r".*got csr_matrix"),
        ),
        "check_estimators_empty_data_messages": (
            _FIT_READS_ONLY_THE_ATLAS + " (an empty array is rejected as an array, with a "
            "TypeError)",
            _NUMERIC_ARRAY_ERROR,
        ),
        "check_estimators_nan_inf": (_FIT_READS_ONLY_THE_ATLAS, _NUMERIC_ARRAY_ERROR),
        "check_do_not_raise_errors_in_init_or_set_params": (
            "passes a keyword literally named 'kwargs'; __init__ takes **kwargs only for "
            "nilearn's older clean__<option> spelling of clean_args and refuses any other "
            "keyword with a TypeError naming it.",
            (TypeError, r"^LabelsMasker got an unexpected keyword argument 'kwargs'"),
        ),
    }
)


@parametrize_with_checks([_ArrayTaggedMasker(_tiny_atlas(), strategy="median", detrend=True)])
def test_labels_masker_estimator_checks(estimator, check):
    _run_pinned(check, estimator, _MASKER_EXPECTED_FAILURES)


def test_masker_asks_for_images():
    with pytest.raises(TypeError, match=r"X is a numeric array of shape \(3, 2\); expected images"):
        LabelsMasker(_tiny_atlas()).fit(np.zeros((3, 2)))


def test_dataframe_column_names_consistency():
    """scikit-learn's column-name check (not yielded by parametrize_with_checks here): string
    names keep scikit-learn's messages although other labels are checked by kwneuro_sk."""
    from sklearn.utils.estimator_checks import check_dataframe_column_names_consistency

    check_dataframe_column_names_consistency("CombatHarmonizer", _RowSiteHarmonizer())
