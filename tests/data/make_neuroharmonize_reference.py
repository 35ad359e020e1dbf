"""Regenerate tests/data/neuroharmonize_gam_reference.npz (see tests/data/README.md).

Run in an environment holding neuroHarmonize 2.5.2 (it pins numpy<2 and pandas<3), e.g.

    python -m venv /tmp/peer && . /tmp/peer/bin/activate
    pip install -e . neuroHarmonize==2.5.2 pytest
    python tests/data/make_neuroharmonize_reference.py

neuroHarmonize picks its GAM smoothing penalty by a random k-fold search; the seed
(``NEUROHARMONIZE_SEED`` in tests/test_gam.py, 0) makes it deterministic, and the live test
there makes the same call (``run_neuroharmonize``).
"""

import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from test_gam import NEUROHARMONIZE_SEED, run_neuroharmonize, simulate_lifespan  # noqa: E402


def main():
    import neuroHarmonize

    frame, _ = simulate_lifespan()
    features = [c for c in frame.columns if c.startswith("f")]
    harmonized = run_neuroharmonize(neuroHarmonize, frame)
    if not np.array_equal(harmonized, run_neuroharmonize(neuroHarmonize, frame)):
        raise SystemExit(f"neuroHarmonize is not deterministic with seed={NEUROHARMONIZE_SEED}")
    out = HERE / "neuroharmonize_gam_reference.npz"
    np.savez_compressed(
        out,
        harmonized=harmonized,
        data=frame[features].to_numpy(),
        age=frame["age"].to_numpy(),
        site=frame["site"].to_numpy().astype(str),
    )
    print(
        f"wrote {out}: neuroHarmonize {version('neuroHarmonize')}, numpy {np.__version__}, "
        f"pandas {pd.__version__}, statsmodels {version('statsmodels')}, "
        f"Python {sys.version.split()[0]}"
    )


if __name__ == "__main__":
    main()
