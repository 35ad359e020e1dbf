"""A cohort table (one row per run) from an fMRIPrep derivatives folder, with nilearn's BIDS
helpers: the table :class:`~kwneuro_sk.ConnectomeExtractor` reads."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import pandas as pd
from sklearn.utils._param_validation import validate_params

# Entities that tell apart versions of one run (outputs of the same acquisition), not runs.
_OUTPUT_ENTITIES = {"space", "res", "den", "desc", "cohort"}
_CONFOUNDS_TAGS = ("timeseries", "regressors")  # fMRIPrep >= 20.2.0, and before
# The output entities a parameter of fmriprep_cohort (of the same name) chooses; desc is
# always "preproc".
_CHOSEN = ("space", "res")


@validate_params(
    {
        "derivatives_dir": [str, os.PathLike],
        "participants_tsv": [str, os.PathLike, None],
        "task": [str, None],
        "space": [str, None],
        "res": [str, None],
    },
    prefer_skip_nested_validation=True,
)
def fmriprep_cohort(derivatives_dir, participants_tsv=None, *, task=None, space=None, res=None):
    """One row per preprocessed fMRI run of an fMRIPrep derivatives folder, with its confounds
    file and its participant's columns.

    The runs are the ``sub-*/[ses-*/]func/*_desc-preproc_bold.nii[.gz]`` files, found and
    parsed with nilearn's BIDS helpers (:func:`nilearn.interfaces.bids.get_bids_files`,
    :func:`~nilearn.interfaces.bids.parse_bids_filename`). Each run's confounds table is the
    ``*_desc-confounds_timeseries.tsv`` (``_regressors.tsv`` before fMRIPrep 20.2) with the same
    subject, session, task, acquisition and run entities.

    Parameters
    ----------
    derivatives_dir : str or path-like
        The fMRIPrep output folder (holding the ``sub-*`` folders).
    participants_tsv : str or path-like, default=None
        The BIDS ``participants.tsv`` (a ``participant_id`` column, with or without the
        ``sub-`` prefix, and one column per participant variable). ``None`` looks for it in
        ``derivatives_dir`` and then in its two parent folders (the raw dataset, when the
        derivatives are in ``<dataset>/derivatives/fmriprep``); if none is found the table has
        no participant columns.
    task : str, default=None
        Keep only this task's runs (the ``task-`` label, e.g. ``"rest"``).
    space : str, default=None
        Keep only runs in this output space (e.g. ``"MNI152NLin2009cAsym"``). Needed when a
        run was written in several volume spaces: a ValueError then lists them.
    res : str, default=None
        Keep only runs at this resolution: the BIDS ``res-`` label (e.g. ``"2"`` for
        ``res-2``; fMRIPrep's ``--output-spaces MNI152NLin2009cAsym:res-2``). Needed when a
        run was written in one space at several resolutions: a ValueError then lists them.

    Returns
    -------
    pandas.DataFrame
        One row per run, sorted by path: ``participant_id`` (``"sub-01"``), ``session``
        (when the dataset has sessions), ``task``, ``run`` (when runs are numbered),
        ``space``, ``image`` (path of the run), ``confounds`` (path of its confounds table,
        None when missing, with a warning), then the columns of ``participants.tsv``.
        Participants without a run are left out.

    Raises
    ------
    FileNotFoundError
        If ``derivatives_dir`` or the given ``participants_tsv`` does not exist.
    ValueError
        If no run matches, a run has several preprocessed images (the message names the
        entities they differ in, e.g. space or res, and the parameter that chooses one), a
        run has several confounds files, or ``participants.tsv`` has no ``participant_id``
        column or a column named like one of the run columns.

    Examples
    --------
    >>> import tempfile
    >>> from kwneuro_sk import fmriprep_cohort
    >>> from kwneuro_sk.datasets import make_fmri_cohort
    >>> cohort = make_fmri_cohort(n_subjects=8, n_volumes=30, data_dir=tempfile.mkdtemp())
    >>> table = fmriprep_cohort(cohort.path, task="rest")
    >>> list(table.columns)
    ['participant_id', 'task', 'space', 'image', 'confounds', 'site', 'age', 'sex', 'diagnosis']
    >>> table["confounds"].str.endswith("_desc-confounds_timeseries.tsv").all()
    np.True_
    """
    from nilearn.interfaces.bids import get_bids_files, parse_bids_filename

    root = Path(derivatives_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"derivatives_dir {os.fspath(root)!r} is not a folder.")
    filters = [("desc", "preproc")]
    chosen = {"task": task, "space": space, "res": res}
    filters += [(entity, value) for entity, value in chosen.items() if value]
    images = get_bids_files(
        root, file_tag="bold", file_type="nii*", modality_folder="func", filters=filters
    )
    images = sorted(p for p in images if p.endswith((".nii", ".nii.gz")))
    if not images:
        raise ValueError(
            f"no fMRIPrep run (sub-*/[ses-*/]func/*_desc-preproc_bold.nii[.gz]) in "
            f"{os.fspath(root)!r} with "
            + ", ".join(f"{name}={value!r}" for name, value in chosen.items())
            + "."
        )

    rows, runs = [], {}
    for image in images:
        entities = dict(parse_bids_filename(image)["entities"])
        key = tuple(sorted((k, v) for k, v in entities.items() if k not in _OUTPUT_ENTITIES))
        rows.append({"entities": entities, "key": key, "image": image})
        runs.setdefault(key, []).append(rows[-1])
    several = {key: found for key, found in runs.items() if len(found) > 1}
    if several:
        raise ValueError(_several_images_message(several))

    table = pd.DataFrame(
        {
            "participant_id": [f"sub-{r['entities']['sub']}" for r in rows],
            "session": [r["entities"].get("ses") for r in rows],
            "task": [r["entities"].get("task") for r in rows],
            "run": [r["entities"].get("run") for r in rows],
            "space": [r["entities"].get("space") for r in rows],
            "image": [r["image"] for r in rows],
            "confounds": [_confounds_file(root, r["entities"], r["image"]) for r in rows],
        }
    )
    table = table.drop(columns=[c for c in ("session", "run") if table[c].isna().all()])
    missing = table.loc[table["confounds"].isna(), "image"].tolist()
    if missing:
        warnings.warn(
            f"{len(missing)} run(s) have no fMRIPrep confounds file beside them (e.g. "
            f"{os.path.basename(missing[0])!r}); their 'confounds' is None.",
            UserWarning,
            stacklevel=3,
        )

    participants = _participants(root, participants_tsv)
    if participants is None:
        return table
    clash = sorted(set(participants.columns) & set(table.columns) - {"participant_id"})
    if clash:
        raise ValueError(
            f"participants.tsv has column(s) {clash}, which are columns of the run table; "
            "rename them."
        )
    unknown = sorted(set(table["participant_id"]) - set(participants["participant_id"]))
    if unknown:
        warnings.warn(
            f"{len(unknown)} participant(s) with runs are not in participants.tsv (e.g. "
            f"{unknown[:3]}); their participant columns are missing values.",
            UserWarning,
            stacklevel=3,
        )
    return table.merge(participants, on="participant_id", how="left", validate="many_to_one")


def _several_images_message(several):
    """What tells apart the preprocessed images of one run (their rows), and how to choose."""
    differ = sorted(
        {
            entity
            for found in several.values()
            for row in found
            for entity in row["entities"]
            if len({other["entities"].get(entity) for other in found}) > 1
        }
    )
    key, found = next(iter(several.items()))
    example = "; ".join(
        f"{entity} {[row['entities'].get(entity) for row in found]}" for entity in differ
    )
    message = (
        f"{len(several)} run(s) have several preprocessed images, which differ in "
        f"{', '.join(differ) or 'nothing but the file name'} (e.g. {dict(key)}: "
        f"{example or [os.path.basename(row['image']) for row in found]});"
    )
    given = [f"{entity}=..." for entity in differ if entity in _CHOSEN]
    if given:
        message += f" pass {' and '.join(given)} to choose one"
    others = [entity for entity in differ if entity not in _CHOSEN]
    if others or not differ:
        message += (
            f"{';' if given else ''} fmriprep_cohort has no parameter that chooses by "
            f"{', '.join(others) or 'file name'}: keep one of those images per run in "
            "derivatives_dir"
        )
    return message + "."


def _confounds_file(root, entities, image):
    """The confounds table with the run's entities (space, resolution and desc aside)."""
    from nilearn.interfaces.bids import get_bids_files, parse_bids_filename

    wanted = {k: v for k, v in entities.items() if k not in _OUTPUT_ENTITIES}
    found = []
    for tag in _CONFOUNDS_TAGS:
        candidates = get_bids_files(
            root,
            file_tag=tag,
            file_type="tsv",
            sub_label=entities["sub"],
            modality_folder="func",
            filters=[("desc", "confounds"), *((k, v) for k, v in wanted.items() if k != "sub")],
        )
        for path in candidates:
            own = dict(parse_bids_filename(path)["entities"])
            own.pop("desc", None)
            if own == wanted and os.path.dirname(path) == os.path.dirname(image):
                found.append(path)
        if found:
            break
    if len(found) > 1:
        raise ValueError(f"several confounds files for {os.path.basename(image)!r}: {found}.")
    return found[0] if found else None


def _participants(root, participants_tsv):
    if participants_tsv is None:
        for folder in [root, *list(root.resolve().parents)[:2]]:
            if (folder / "participants.tsv").is_file():
                participants_tsv = folder / "participants.tsv"
                break
        else:
            return None
    path = Path(participants_tsv)
    if not path.is_file():
        raise FileNotFoundError(f"participants_tsv {os.fspath(path)!r} not found.")
    try:
        participants = pd.read_csv(
            path, sep="\t", dtype={"participant_id": str}, na_values=["n/a"], keep_default_na=True
        )
    except ValueError as error:  # pandas' EmptyDataError, ParserError, UnicodeDecodeError
        raise ValueError(
            f"participants_tsv {os.fspath(path)!r} cannot be read as a TSV table: "
            f"{' '.join(str(error).split())}"
        ) from None
    if "participant_id" not in participants.columns:
        raise ValueError(
            f"{os.fspath(path)!r} has no 'participant_id' column (columns: "
            f"{list(participants.columns)[:10]})."
        )
    blank = participants["participant_id"].isna() | (
        participants["participant_id"].str.strip() == ""
    )
    if blank.any():
        rows = [int(i) + 1 for i in blank.to_numpy().nonzero()[0][:5]]
        raise ValueError(
            f"{os.fspath(path)!r} has no participant_id in row(s) {rows} below the header "
            "(empty or 'n/a')."
        )
    ids = participants["participant_id"].astype(str).str.strip()
    participants["participant_id"] = ids.where(ids.str.startswith("sub-"), "sub-" + ids)
    duplicated = participants["participant_id"][participants["participant_id"].duplicated()]
    if len(duplicated):
        raise ValueError(
            f"{os.fspath(path)!r} lists participant(s) {sorted(set(duplicated))[:5]} more than "
            "once."
        )
    return participants
