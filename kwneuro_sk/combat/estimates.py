"""CombatEstimates: the fitted ComBat model as plain data."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CombatEstimates:
    """Fitted ComBat estimates and the information needed to use them.

    Parameters
    ----------
    estimates : dict
        Arrays of the fitted model, keyed as the fitted attributes of
        :class:`~kwneuro_sk.CombatHarmonizer` without the trailing underscore:
        ``grand_mean``, ``var_pooled``, ``beta``, ``gamma_hat``, ``delta_hat``,
        ``gamma_star``, ``delta_star``, ``gamma_bar``, ``t2``, ``a_prior``, ``b_prior``,
        ``zero_variance_features``.
    info : dict
        Everything else: ``batches``, ``n_samples_per_batch``, ``ref_batch``, ``feature_names``,
        ``covariate_names``, the covariate columns and categories, and the options ``eb``,
        ``parametric``, ``mean_only``, ``unseen_batch``.

    Examples
    --------
    >>> import numpy as np
    >>> from kwneuro_sk import CombatHarmonizer
    >>> rng = np.random.default_rng(0)
    >>> X = rng.normal(size=(20, 4)) + np.repeat([0.0, 2.0], 10)[:, None]
    >>> est = CombatHarmonizer().fit(X, batch=np.repeat(["a", "b"], 10)).estimates_
    >>> est.estimates["gamma_star"].shape
    (2, 4)
    >>> est.info["batches"].tolist()
    ['a', 'b']
    """

    estimates: dict = field(default_factory=dict)
    info: dict = field(default_factory=dict)
