"""The ``kwneuro-sk`` command line: demo, harmonize, apply, summarize, combine, maps, extract.

Every command prints what it did; errors in the input end with a one-line message on stderr and
exit status 1 (usage errors: 2).
"""

from __future__ import annotations

import argparse
import re
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from kwneuro_sk._files import StagedFiles
from kwneuro_sk.maskers._reduce import STRATEGIES

PROG = "kwneuro-sk"


class CommandError(Exception):
    """An error in what the user asked for, reported without a traceback."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


# Cells pandas reads as missing by default; here they are missing only in number columns.
_NA_TEXT = frozenset(
    {
        "",
        "#N/A",
        "#N/A N/A",
        "#NA",
        "-1.#IND",
        "-1.#QNAN",
        "-NaN",
        "-nan",
        "1.#IND",
        "1.#QNAN",
        "<NA>",
        "N/A",
        "NA",
        "NULL",
        "NaN",
        "None",
        "n/a",
        "nan",
        "null",
    }
)


def _separator(path):
    """Tab for .tsv/.tab files, comma otherwise (for reading and writing alike)."""
    return "\t" if Path(path).suffix.lower() in {".tsv", ".tab"} else ","


def _read_table(path):
    """A CSV/TSV table with every cell as text, exactly as written (``007`` stays ``007``,
    ``NA`` stays ``NA``); number columns are parsed later by :func:`_numbers`."""
    path = Path(path)
    if path.is_dir():
        raise CommandError(f"{path} is a directory, not a table file")
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    try:
        frame = pd.read_csv(path, sep=_separator(path), dtype=str, keep_default_na=False)
    except pd.errors.EmptyDataError:
        raise CommandError(
            f"{path} is empty: expected a header line and one row per subject"
        ) from None
    except (ValueError, UnicodeDecodeError) as error:
        raise CommandError(
            f"{path} cannot be read as a "
            f"{'TSV' if _separator(path) == chr(9) else 'CSV'} table: "
            f"{' '.join(str(error).split())}"
        ) from None
    if frame.empty:
        raise CommandError(f"{path} has a header but no rows")
    header = pd.read_csv(path, sep=_separator(path), dtype=str, header=None, nrows=1)
    names = header.iloc[0].tolist()
    repeated = sorted({str(n) for n in names if names.count(n) > 1})
    if repeated:  # pandas would rename the second one ('f0.1') and write it back so
        raise CommandError(
            f"{path} has more than one column named {repeated}; give every column its own name"
        )
    return frame


def _numbers(frame, columns, path, *, role="feature"):
    """The named text columns parsed as numbers (missing-value spellings -> NaN), or an error
    naming the columns, a line and its value."""
    columns = list(columns)
    try:  # fast path, in C: every cell a plain number (wide tables have thousands of columns)
        block = frame[columns].to_numpy(dtype=object).astype(np.float64)
        return pd.DataFrame(block, index=frame.index, columns=columns)
    except ValueError:
        pass  # an empty or missing-value cell, or text: column by column, naming the cell
    out, bad = {}, []
    for col in columns:
        text = frame[col].str.strip()
        values = pd.to_numeric(text.where(~text.isin(_NA_TEXT)), errors="coerce")
        wrong = values.isna().to_numpy() & ~text.isin(_NA_TEXT).to_numpy()
        if wrong.any():
            row = int(wrong.argmax())
            bad.append((col, row, frame[col].iloc[row]))
        out[col] = values.astype(np.float64)
    if bad:
        col, row, value = bad[0]
        names = [c for c, _, _ in bad]
        hint = (
            "copy them unchanged with --keep, or name them with --batch-col/--categorical"
            if role == "feature"
            else "give numbers, or use --categorical instead"
        )
        raise CommandError(
            f"{role} column(s) {names} are not numeric ({path} line {row + 2}, "
            f"column {col!r}: {value!r}); {hint}"
        )
    return pd.DataFrame(out, index=frame.index)


def _labels(frame, columns, path, option):
    """Site or categorical covariate columns as text labels; an empty or missing-value cell
    (``""``, ``NA``, ...) is an error naming the column and line, not a label."""
    for col in columns:
        missing = frame[col].str.strip().isin(_NA_TEXT).to_numpy()
        if missing.any():
            row = int(missing.argmax())
            raise CommandError(
                f"{option} column {col!r} has no value in {path} line "
                f"{row + 2} ({frame[col].iloc[row]!r}); every row needs one"
            )
    return frame[columns].astype(object)


def _check_columns(frame, path, **options):
    for option, cols in options.items():
        cols = [cols] if isinstance(cols, str) else list(cols)
        missing = [c for c in cols if c not in frame.columns]
        if missing:
            raise CommandError(
                f"{option} column(s) {missing} not found in {path} (columns: {list(frame.columns)})"
            )


def _as_fitted_labels(text, labels):
    """Text cells mapped to the fitted labels they spell (``'2'`` -> ``2`` for a model fitted
    with integer sites); other cells stay text."""
    by_text = {str(label): label for label in np.asarray(labels, dtype=object).tolist()}
    return text.map(lambda value: by_text.get(value, value)).astype(object)


def _match_label(value, labels):
    """The command line gives text; find the site label it means (e.g. '2' -> 2)."""
    if value is None:
        return None
    known = list(dict.fromkeys(np.asarray(labels, dtype=object).tolist()))
    for label in known:
        if str(label) == value:
            return label
    raise CommandError(f"--ref-batch {value!r} is not among the sites {sorted(map(str, known))}")


def _check_outputs(outputs, inputs):
    """Check every output before anything is read, computed or written: not a directory, not
    one of the inputs (resolved paths, so ``a/../in.csv`` and symlinks count), not another
    output. ``outputs`` and ``inputs`` are {description: path}."""
    checker = StagedFiles(PROG, error=CommandError)
    named_inputs = {f"{what} {source}": source for what, source in inputs.items()}
    seen = {}
    for option, out in outputs.items():
        if out is None:
            continue
        if Path(out).is_dir():
            raise CommandError(f"{option} {out} is a directory; give a file name")
        checker.check(out, option, named_inputs)
        resolved = Path(out).resolve()
        if resolved in seen:
            raise CommandError(f"{option} and {seen[resolved]} are the same file {out}")
        seen[resolved] = option


class _Staged(StagedFiles):
    """Outputs of one command written to temporary files next to their targets and renamed
    over them only when every output is ready (os.replace): a failure leaves no partial or
    clobbered file, and removes the folders the command created for its outputs."""

    def __init__(self, command="kwneuro-sk"):
        super().__init__(command, error=CommandError)

    def folders(self, outputs):
        """Create the folder of every output ({option: path}) before anything is written."""
        for option, out in outputs.items():
            if out is not None:
                self.make_folder(Path(out).resolve().parent, f"the folder of {option}")

    def table(self, frame, target):
        frame.to_csv(self.path_for(target), index=False, sep=_separator(target))


def _progress(done, total, start):
    stream = sys.stderr
    width = 30
    filled = int(width * done / total)
    elapsed = time.perf_counter() - start
    stream.write(
        f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images {elapsed:5.1f} s"
    )
    if done == total:
        stream.write("\n")
    stream.flush()


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def _combat_input(args, frame):
    """The table ComBat reads (site and covariate columns as labels/numbers, features as
    numbers) and the feature columns, from the harmonize/summarize options."""
    subject = [args.subject] if getattr(args, "subject", None) else []
    text = [args.batch_col, *args.categorical, *subject]
    smooth = getattr(args, "smooth", [])
    role = {}  # one role a column: else it would enter the table twice
    for option, cols in {
        "--batch-col": [args.batch_col],
        "--categorical": args.categorical,
        "--subject": subject,
        "--continuous": args.continuous,
        "--smooth": smooth,
    }.items():
        for col in cols:
            if col in role:
                raise CommandError(
                    f"column {col!r} is given to both {role[col]} and {option}; give each "
                    "column one role"
                    if role[col] != option
                    else f"column {col!r} is given twice to {option}"
                )
            role[col] = option
    features = [c for c in frame.columns if c not in {*text, *args.continuous, *smooth, *args.keep}]
    X = pd.concat(
        [
            _labels(frame, [args.batch_col], args.features, "--batch-col"),
            _labels(frame, args.categorical, args.features, "--categorical"),
            _labels(frame, subject, args.features, "--subject"),
            _numbers(frame, args.continuous, args.features, role="--continuous"),
            _numbers(frame, smooth, args.features, role="--smooth"),
            _numbers(frame, features, args.features),
        ],
        axis=1,
    )
    return X[[c for c in frame.columns if c in X.columns]], features


def _read_combat_table(args, **options):
    frame = _read_table(args.features)
    if args.batch_col not in frame.columns:
        raise CommandError(
            f"--batch-col {args.batch_col!r} is not a column of "
            f"{args.features} (columns: {list(frame.columns)})"
        )
    _check_columns(frame, args.features, **options)
    return frame


def _knot_positions(smooth, specs, degree):
    """``{column: [knot, ...]}`` from ``--smooth-knots COL=K1,K2,...`` (one per ``--smooth``
    column): a summary holds statistics on fixed knots, the same at every site."""
    if not smooth:
        if specs:
            raise CommandError("--smooth-knots needs --smooth")
        return 5
    if degree < 1:
        raise CommandError(f"--smooth-degree must be 1 or more; got {degree}")
    knots = {}
    for spec in specs:
        column, sep, values = spec.partition("=")
        if not sep or column not in smooth:
            raise CommandError(
                f"--smooth-knots {spec!r}: expected COL=K1,K2,... with COL one of --smooth {smooth}"
            )
        if column in knots:
            raise CommandError(f"--smooth-knots gives the knots of {column!r} twice")
        try:
            knots[column] = [float(v) for v in values.split(",")]
        except ValueError:
            raise CommandError(
                f"--smooth-knots {spec!r}: the knots of {column!r} must be numbers"
            ) from None
    missing = [c for c in smooth if c not in knots]
    if missing:
        raise CommandError(
            f"--smooth-knots COL=K1,K2,... is needed for {missing}: every site must use the "
            "same knot positions (e.g. round values spanning the consortium's range)"
        )
    return knots


def cmd_summarize(args):
    """Summarize one site's feature table for federated ComBat (no row leaves the site)."""
    from kwneuro_sk import CombatHarmonizer

    _check_outputs({"-o": args.output}, {"input table": args.features})
    frame = _read_combat_table(
        args,
        **{
            "--categorical": args.categorical,
            "--continuous": args.continuous,
            "--smooth": args.smooth,
            "--keep": args.keep,
        },
    )
    X, features = _combat_input(args, frame)
    summary = CombatHarmonizer(
        batch_col=args.batch_col,
        categorical_cols=args.categorical or None,
        continuous_cols=args.continuous or None,
        smooth_cols=args.smooth or None,
        smooth_knots=_knot_positions(args.smooth, args.smooth_knots, args.smooth_degree),
        smooth_degree=args.smooth_degree,
    ).site_summary(X, min_rows=args.min_rows)
    with _Staged("kwneuro-sk summarize") as staged:
        staged.folders({"-o": args.output})
        summary.save(staged.path_for(args.output))
        staged.commit()
    print(
        f"summarized {len(features)} features of {len(frame)} rows from site(s) "
        f"{summary.sites} ({summary.n_values} numbers) -> {args.output}"
    )
    return 0


def cmd_combine(args):
    """Fit ComBat from site summaries (coordinator) and save the model for 'apply'."""
    from kwneuro_sk import CombatHarmonizer, SiteSummary

    _check_outputs({"-o": args.output}, {f"summary {i}": p for i, p in enumerate(args.summaries)})
    summaries = [SiteSummary.load(path) for path in args.summaries]
    first = summaries[0]
    sites = [s for summary in summaries for s in summary.sites]
    smooth = first.statistics.smooth
    spline = next(iter(smooth.values()), {})
    combat = CombatHarmonizer(
        batch_col=first.features["batch_col"],
        categorical_cols=first.covariates["categorical_cols"] or None,
        continuous_cols=first.covariates["continuous_cols"] or None,
        smooth_cols=list(smooth) or None,
        smooth_knots={col: spec["knots"] for col, spec in smooth.items()} if smooth else 5,
        smooth_degree=spline.get("degree", 3),
        smooth_extrapolation=spline.get("extrapolation", "linear"),
        eb=args.eb,
        parametric=args.parametric,
        mean_only=args.mean_only,
        ref_batch=_match_label(args.ref_batch, sites),
    ).fit_from_summaries(summaries)
    with _Staged("kwneuro-sk combine") as staged:
        staged.folders({"-o": args.output})
        combat.estimates_.save(staged.path_for(args.output))
        staged.commit()
    print(
        f"fitted ComBat on {int(combat.n_samples_per_batch_.sum())} rows of "
        f"{len(combat.batches_)} sites from {len(summaries)} summaries -> {args.output}"
    )
    return 0


def cmd_harmonize(args):
    """Fit ComBat on a feature table and write the harmonized table."""
    from kwneuro_sk import CombatHarmonizer

    outputs = {"-o": args.output, "--save-model": args.save_model, "--report": args.report}
    _check_outputs(outputs, {"input table": args.features})
    frame = _read_combat_table(
        args,
        **{
            "--categorical": args.categorical,
            "--continuous": args.continuous,
            "--smooth": args.smooth,
            "--keep": args.keep,
            "--subject": [args.subject] if args.subject else [],
        },
    )
    X, features = _combat_input(args, frame)
    with _Staged("kwneuro-sk harmonize") as staged:
        staged.folders(outputs)
        combat = CombatHarmonizer(
            batch_col=args.batch_col,
            categorical_cols=args.categorical or None,
            continuous_cols=args.continuous or None,
            eb=args.eb,
            parametric=args.parametric,
            mean_only=args.mean_only,
            ref_batch=_match_label(args.ref_batch, frame[args.batch_col]),
            smooth_cols=args.smooth or None,
            smooth_knots=args.smooth_knots,
            subject_col=args.subject,
            random_slope=args.random_slope,
            sigma_method=args.sigma_method,
        ).set_output(transform="pandas")
        harmonized = combat.fit_transform(X)
        out = frame.copy()  # every other column written back exactly as read
        out[features] = harmonized.to_numpy()
        staged.table(out, args.output)
        if args.save_model:
            combat.estimates_.save(staged.path_for(args.save_model))
        if args.report:  # made before any output is committed: a failing report leaves none
            from kwneuro_sk.report import harmonization_report

            harmonization_report(combat, X, harmonized).save(staged.path_for(args.report))
        staged.commit()
    print(
        f"harmonized {harmonized.shape[1]} features of {len(frame)} rows from "
        f"{len(combat.batches_)} sites -> {args.output}"
    )
    if args.save_model:
        print(f"model saved -> {args.save_model}")
    if args.report:
        print(f"report -> {args.report}")
    return 0


def cmd_apply(args):
    """Harmonize new rows with a model saved by ``harmonize --save-model``."""
    from kwneuro_sk import CombatEstimates, CombatHarmonizer
    from kwneuro_sk.combat._inputs import ColumnRoles

    _check_outputs({"-o": args.output}, {"model": args.model, "input table": args.features})
    if Path(args.model).is_dir():
        raise CommandError(f"model {args.model} is a directory, not a model file")
    if not Path(args.model).is_file():
        raise CommandError(f"no such model file: {args.model}")
    combat = CombatHarmonizer.from_estimates(CombatEstimates.load(args.model))
    if args.adapt_new_sites:
        combat.set_params(unseen_batch="adapt")
    columns = getattr(combat, "_columns_in", None)
    if "volumes" in combat.estimates_.info:
        raise CommandError(
            f"{args.model} was made by harmonize_volumes (a voxel-wise model); "
            "apply harmonizes tables: use VolumeEstimates.apply_volumes in "
            "Python for images"
        )
    if combat.batch_col is None or columns is None:
        raise CommandError(
            f"{args.model} was fitted with the sites given as batch= (not as a "
            "column of a table); apply needs a model saved by 'kwneuro-sk "
            "harmonize --save-model' or fitted with batch_col"
        )
    frame = _read_table(args.features)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CommandError(
            f"{args.features} lacks column(s) {missing} that the model was fitted with"
        )
    info = combat.estimates_.info
    text = {
        combat.batch_col: info["batches"],
        **dict(zip(info["categorical_cols"], info["categories"])),
    }
    roles = ColumnRoles.from_info(info)
    continuous = roles.numeric  # continuous and smooth covariates: numbers, not features
    features = roles.features(columns)
    for col in text:
        _labels(frame, [col], args.features, "site" if col == combat.batch_col else "categorical")
    parts = [_as_fitted_labels(frame[c], labels).rename(c) for c, labels in text.items()]
    if roles.subject is not None:  # longitudinal model: subjects seen in fit or new ones
        parts.append(_labels(frame, [roles.subject], args.features, "subject"))
    X = pd.concat(
        [
            *parts,
            _numbers(frame, continuous, args.features, role="--continuous"),
            _numbers(frame, features, args.features),
        ],
        axis=1,
    )[columns]
    with _Staged("kwneuro-sk apply") as staged:
        staged.folders({"-o": args.output})
        harmonized = combat.set_output(transform="pandas").transform(X)
        out = frame.copy()
        out[features] = harmonized.to_numpy()
        staged.table(out, args.output)
        staged.commit()
    print(f"harmonized {harmonized.shape[1]} features of {len(frame)} rows -> {args.output}")
    return 0


def cmd_maps(args):
    """Write the site-effect maps of a voxel-wise model (harmonize_volumes) as NIfTI files."""
    from kwneuro_sk import CombatEstimates
    from kwneuro_sk.volumes import site_effect_maps

    if Path(args.model).is_dir():
        raise CommandError(f"model {args.model} is a directory, not a model file")
    if not Path(args.model).is_file():
        raise CommandError(f"no such model file: {args.model}")
    estimates = CombatEstimates.load(args.model)
    if "volumes" not in estimates.info:
        raise CommandError(
            f"{args.model} is not a voxel-wise model (made by harmonize_volumes): it has no "
            "mask to place site effects in"
        )
    written = site_effect_maps(estimates, output_dir=args.output)
    print(
        f"wrote {len(written)} maps (gamma*, delta* of {len(estimates.info['batches'])} "
        f"sites, pooled standard deviation) -> {args.output}"
    )
    return 0


def cmd_extract(args):
    """Region values of each image with a labels atlas, one row per image."""
    from kwneuro_sk import LabelsMasker

    inputs = {"atlas": args.atlas, "labels table": args.labels, "image table": args.from_csv}
    if args.from_csv:
        if args.images:
            raise CommandError("give images either as arguments or with --from-csv, not both")
        table = _read_table(args.from_csv)
        if args.column not in table.columns:
            raise CommandError(
                f"--column {args.column!r} is not a column of {args.from_csv} "
                f"(columns: {list(table.columns)})"
            )
        empty = table[args.column].str.strip() == ""
        if empty.any():
            row = int(empty.to_numpy().argmax())
            raise CommandError(
                f"{args.from_csv} line {row + 2}: column {args.column!r} is "
                "empty; every row needs an image path"
            )
        base = Path(args.from_csv).parent
        images = [str(p if Path(p).is_absolute() else base / p) for p in table[args.column]]
    elif args.images:
        table = pd.DataFrame({"image": args.images})
        images = list(args.images)
    else:
        raise CommandError("no images: give image paths, or --from-csv CSV --column COLUMN")
    _check_outputs({"-o": args.output}, {**inputs, **{f"image {p}": p for p in images}})
    with _Staged("kwneuro-sk extract") as staged:
        staged.folders({"-o": args.output})
        masker = LabelsMasker(args.atlas, labels=args.labels, strategy=args.strategy)
        masker.set_output(transform="pandas").fit()
        chunk = max(1, len(images) // 50)
        show = len(images) >= 20 and not args.quiet
        start = time.perf_counter()
        parts = []
        for i in range(0, len(images), chunk):
            parts.append(masker.transform(images[i : i + chunk]))
            if show:
                _progress(min(i + chunk, len(images)), len(images), start)
        regions = pd.concat(parts, ignore_index=True)
        out = pd.concat([table.reset_index(drop=True), regions], axis=1)
        staged.table(out, args.output)
        staged.commit()
    print(
        f"extracted {regions.shape[1]} regions ({args.strategy}) from {len(images)} images "
        f"-> {args.output}"
    )
    return 0


def cmd_demo(args):
    """Demo cohort -> LabelsMasker -> CombatHarmonizer -> classifier, cross-validated."""
    from kwneuro_sk.demo import run_demo

    run_demo(
        n_subjects=args.n_subjects,
        data_dir=args.data_dir,
        output_dir=args.output_dir,
        figure=not args.no_figure,
    )
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Multi-site neuroimaging harmonization (ComBat) and region "
        "extraction, built on scikit-learn.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo",
        help="simulate a multi-site cohort and show what harmonization does",
        description="Build a simulated cohort of MNI-grid images (no download), extract region "
        "values, and cross-validate a diagnosis classifier with and without ComBat inside the "
        "pipeline, under StratifiedKFold and leave-one-site-out.",
    )
    demo.add_argument("--n-subjects", type=int, default=120, help="cohort size (default 120)")
    demo.add_argument(
        "--data-dir",
        help="where the cohort is cached (default: $KWNEURO_SK_DATA or the user cache folder)",
    )
    demo.add_argument(
        "--output-dir",
        default="kwneuro_sk_demo",
        help="where the table and figures go (default ./kwneuro_sk_demo)",
    )
    demo.add_argument("--no-figure", action="store_true", help="do not draw figures")
    demo.set_defaults(func=cmd_demo)

    harm = sub.add_parser(
        "harmonize",
        help="fit ComBat on a feature table and harmonize it",
        description="Fit ComBat on FEATURES (CSV or TSV: one row per subject; the site column, "
        "covariate columns and --keep columns are not harmonized, every other column is a "
        "feature) and write the harmonized table.",
    )
    harm.add_argument("features", metavar="FEATURES.csv")
    harm.add_argument("--batch-col", required=True, help="name of the site column")
    harm.add_argument(
        "--categorical",
        nargs="+",
        default=[],
        metavar="COL",
        help="categorical covariates whose effects are kept",
    )
    harm.add_argument(
        "--continuous",
        nargs="+",
        default=[],
        metavar="COL",
        help="continuous covariates whose effects are kept",
    )
    harm.add_argument(
        "--keep",
        nargs="+",
        default=[],
        metavar="COL",
        help="columns copied to the output unchanged (e.g. subject IDs)",
    )
    harm.add_argument(
        "--eb",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="empirical Bayes shrinkage (default: --eb)",
    )
    kind = harm.add_mutually_exclusive_group()
    kind.add_argument(
        "--parametric",
        dest="parametric",
        action="store_true",
        default=True,
        help="parametric empirical Bayes (default)",
    )
    kind.add_argument(
        "--non-parametric",
        dest="parametric",
        action="store_false",
        help="non-parametric empirical Bayes",
    )
    harm.add_argument("--mean-only", action="store_true", help="adjust site means only")
    harm.add_argument("--ref-batch", metavar="SITE", help="reference site, left unchanged")
    harm.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    harm.add_argument(
        "--save-model", metavar="MODEL", help="save the fitted model to this file (for 'apply')"
    )
    harm.add_argument(
        "--smooth",
        nargs="+",
        default=[],
        metavar="COL",
        help="continuous covariates modelled as smooth curves (ComBat-GAM)",
    )
    harm.add_argument(
        "--smooth-knots",
        type=int,
        default=5,
        metavar="K",
        help="knots per smooth covariate (default 5)",
    )
    harm.add_argument(
        "--subject",
        metavar="COL",
        help="subject column of repeated scans: longitudinal ComBat with a random intercept "
        "per subject (see the user guide, Longitudinal data)",
    )
    harm.add_argument(
        "--random-slope",
        metavar="COL",
        help="with --subject: a --continuous column (e.g. time) with a random slope per subject",
    )
    harm.add_argument(
        "--sigma-method",
        choices=["reml", "msr"],
        default="reml",
        help="with --subject: scale of the standardization, the REML residual standard "
        "deviation (default) or the mean squared residual",
    )
    harm.add_argument(
        "--report",
        metavar="REPORT.html",
        help="also write a self-contained HTML report (needs matplotlib)",
    )
    harm.set_defaults(func=cmd_harmonize)

    summarize = sub.add_parser(
        "summarize",
        help="summarize one site's table for federated ComBat",
        description="Write the per-site statistics of FEATURES (as for 'harmonize') that "
        "'combine' fits ComBat from: aggregates only, never a row (see the user guide, "
        "Federated harmonization).",
    )
    summarize.add_argument("features", metavar="FEATURES.csv")
    summarize.add_argument("--batch-col", required=True, help="name of the site column")
    for option, what in (("--categorical", "categorical"), ("--continuous", "continuous")):
        summarize.add_argument(
            option, nargs="+", default=[], metavar="COL", help=f"{what} covariates"
        )
    summarize.add_argument(
        "--keep", nargs="+", default=[], metavar="COL", help="columns that are not features"
    )
    summarize.add_argument(
        "--smooth",
        nargs="+",
        default=[],
        metavar="COL",
        help="continuous covariates modelled as smooth curves (needs --smooth-knots)",
    )
    summarize.add_argument(
        "--smooth-knots",
        nargs="+",
        default=[],
        metavar="COL=K1,K2,...",
        help="knot positions of each --smooth column, the same at every site",
    )
    summarize.add_argument(
        "--smooth-degree", type=int, default=3, metavar="D", help="spline degree (default 3)"
    )
    summarize.add_argument(
        "--min-rows", type=int, default=10, metavar="N", help="smallest site (default 10)"
    )
    summarize.add_argument("-o", "--output", required=True, metavar="SUMMARY.npz")
    summarize.set_defaults(func=cmd_summarize)

    combine = sub.add_parser(
        "combine",
        help="fit ComBat from site summaries (coordinator)",
        description="Fit ComBat from the summaries written by 'summarize' at each site and "
        "save the model, which each site applies to its own rows with 'apply'.",
    )
    combine.add_argument("summaries", nargs="+", metavar="SUMMARY.npz")
    combine.add_argument(
        "--eb", action=argparse.BooleanOptionalAction, default=True, help="empirical Bayes"
    )
    combine.add_argument("--non-parametric", dest="parametric", action="store_false", default=True)
    combine.add_argument("--mean-only", action="store_true", help="adjust site means only")
    combine.add_argument("--ref-batch", metavar="SITE", help="reference site, left unchanged")
    combine.add_argument("-o", "--output", required=True, metavar="MODEL.npz")
    combine.set_defaults(func=cmd_combine)

    apply = sub.add_parser(
        "apply",
        help="harmonize new rows with a saved model",
        description="Harmonize the rows of NEW.csv with a model saved by 'harmonize "
        "--save-model'; each row is adjusted with its own site and covariates. Columns the "
        "model was not fitted with are copied unchanged.",
    )
    apply.add_argument("model", metavar="MODEL")
    apply.add_argument("features", metavar="NEW.csv")
    apply.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    apply.add_argument(
        "--adapt-new-sites",
        action="store_true",
        help="estimate sites unseen in fit from their rows (default: error)",
    )
    apply.set_defaults(func=cmd_apply)

    maps = sub.add_parser(
        "maps",
        help="site-effect maps of a voxel-wise model",
        description="Write gamma* and delta* of each site and the pooled standard deviation "
        "of a model saved from harmonize_volumes as NIfTI images in the mask's space "
        "(DIR/gamma_star_<site>.nii.gz, DIR/delta_star_<site>.nii.gz, DIR/sigma.nii.gz); all "
        "or nothing.",
    )
    maps.add_argument("model", metavar="MODEL")
    maps.add_argument("-o", "--output", required=True, metavar="DIR")
    maps.set_defaults(func=cmd_maps)

    extract = sub.add_parser(
        "extract",
        help="region values of images with a labels atlas",
        description="One row per image, one column per region of the atlas.",
    )
    extract.add_argument("images", nargs="*", metavar="IMAGE", help="3D images (.nii/.nii.gz)")
    extract.add_argument("--atlas", required=True, help="labels image")
    extract.add_argument("--labels", help="look-up table (TSV with index and name columns)")
    extract.add_argument("--strategy", default="mean", choices=STRATEGIES)
    extract.add_argument(
        "--from-csv",
        metavar="CSV",
        help="table whose --column holds the image paths; its other columns "
        "are copied to the output",
    )
    extract.add_argument("--column", default="image", help="image column of --from-csv")
    extract.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    extract.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(func=cmd_extract)
    return parser


# The library's advice names Python parameters; on the command line they are options.
_CLI_TERMS = [
    (r"batch_col/categorical_cols/continuous_cols", "--batch-col/--categorical/--continuous"),
    (r"categorical_cols/continuous_cols", "--categorical/--continuous"),
    (r"mean_only=True", "--mean-only"),
    (r"unseen_batch='adapt'", "--adapt-new-sites"),
    (r"eb=False", "--no-eb"),
    (
        r"Use LabelsMasker\.transform_imgs for 4D time series\.",
        "Give one 3D image per subject (split 4D files first).",
    ),
    (r"(?<![\w'\[])categorical_cols(?![\w'])", "--categorical"),
    (r"(?<![\w'\[])continuous_cols(?![\w'])", "--continuous"),
    (r"(?<![\w'\[])smooth_cols(?![\w'])", "--smooth"),
    (r"(?<![\w'\[])smooth_knots(?![\w'])", "--smooth-knots"),
    (r"(?<![\w'\[])batch_col(?![\w'=])", "--batch-col"),
    (r"(?<![\w'\[])subject_col(?![\w'])", "--subject"),
    (r"(?<![\w'\[])random_slope(?![\w'])", "--random-slope"),
]


def _one_line(message):
    """An error message on one line, in command-line terms."""
    text = " ".join(str(message).split())
    for pattern, option in _CLI_TERMS:
        text = re.sub(pattern, option, text)
    return text


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        notes = "".join(f" ({note})" for note in getattr(exc, "__notes__", ()))
        print(f"{PROG} {args.command}: error: {_one_line(message)}{notes}", file=sys.stderr)
        return 1
    except OSError as exc:  # permissions, full disk, ...: the file and the reason
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG} {args.command}: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
