"""The ``kwneuro-sk`` command line: demo, harmonize, apply, extract.

Every command prints what it did; errors in the input end with a one-line message on stderr and
exit status 1 (usage errors: 2).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd

PROG = "kwneuro-sk"


class CommandError(Exception):
    """An error in what the user asked for, reported without a traceback."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _read_table(path):
    path = Path(path)
    if not path.is_file():
        raise CommandError(f"no such file: {path}")
    sep = "\t" if path.suffix.lower() in {".tsv", ".tab"} else ","
    return pd.read_csv(path, sep=sep)


def _write_table(frame, path):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, index=False, sep="\t" if path.suffix.lower() == ".tsv" else ",")


def _match_label(value, labels):
    """The command line gives text; find the site label it means (e.g. '2' -> 2)."""
    if value is None:
        return None
    for label in pd.unique(labels):
        if str(label) == value:
            return label
    raise CommandError(f"--ref-batch {value!r} is not among the sites "
                       f"{sorted(map(str, pd.unique(labels)))}")


def _split_keep(frame, keep):
    missing = [c for c in keep if c not in frame.columns]
    if missing:
        raise CommandError(f"--keep column(s) {missing} not found (columns: "
                           f"{list(frame.columns)})")
    return frame.drop(columns=keep)


def _progress(done, total, start):
    stream = sys.stderr
    width = 30
    filled = int(width * done / total)
    elapsed = time.perf_counter() - start
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} images "
                 f"{elapsed:5.1f} s")
    if done == total:
        stream.write("\n")
    stream.flush()


# --------------------------------------------------------------------------------------------
# commands
# --------------------------------------------------------------------------------------------


def cmd_harmonize(args):
    """Fit ComBat on a feature table and write the harmonized table."""
    from kwneuro_sk import CombatHarmonizer

    frame = _read_table(args.features)
    if args.batch_col not in frame.columns:
        raise CommandError(f"--batch-col {args.batch_col!r} is not a column of "
                           f"{args.features} (columns: {list(frame.columns)})")
    combat = CombatHarmonizer(
        batch_col=args.batch_col, categorical_cols=args.categorical or None,
        continuous_cols=args.continuous or None, eb=args.eb, parametric=args.parametric,
        mean_only=args.mean_only, ref_batch=_match_label(args.ref_batch, frame[args.batch_col]),
        smooth_cols=args.smooth or None, smooth_knots=args.smooth_knots,
    ).set_output(transform="pandas")
    harmonized = combat.fit_transform(_split_keep(frame, args.keep))
    out = frame.copy()
    out[list(harmonized.columns)] = harmonized.to_numpy()
    _write_table(out, args.output)
    print(f"harmonized {harmonized.shape[1]} features of {len(frame)} rows from "
          f"{len(combat.batches_)} sites -> {args.output}")
    if args.save_model:
        combat.estimates_.save(args.save_model)
        print(f"model saved -> {args.save_model}")
    if args.report:
        from kwneuro_sk.report import harmonization_report

        harmonization_report(combat, _split_keep(frame, args.keep), harmonized).save(args.report)
        print(f"report -> {args.report}")
    return 0


def cmd_apply(args):
    """Harmonize new rows with a model saved by ``harmonize --save-model``."""
    from kwneuro_sk import CombatEstimates, CombatHarmonizer

    if not Path(args.model).is_file():
        raise CommandError(f"no such model file: {args.model}")
    combat = CombatHarmonizer.from_estimates(CombatEstimates.load(args.model))
    if args.adapt_new_sites:
        combat.set_params(unseen_batch="adapt")
    frame = _read_table(args.features)
    columns = list(getattr(combat, "feature_names_in_", []))
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise CommandError(f"{args.features} lacks column(s) {missing} that the model was "
                           "fitted with")
    harmonized = combat.set_output(transform="pandas").transform(frame[columns])
    out = frame.copy()
    out[list(harmonized.columns)] = harmonized.to_numpy()
    _write_table(out, args.output)
    print(f"harmonized {harmonized.shape[1]} features of {len(frame)} rows -> {args.output}")
    return 0


def cmd_extract(args):
    """Region values of each image with a labels atlas, one row per image."""
    from kwneuro_sk import LabelsMasker

    if args.from_csv:
        if args.images:
            raise CommandError("give images either as arguments or with --from-csv, not both")
        table = _read_table(args.from_csv)
        if args.column not in table.columns:
            raise CommandError(f"--column {args.column!r} is not a column of {args.from_csv} "
                               f"(columns: {list(table.columns)})")
        base = Path(args.from_csv).parent
        images = [str(p if Path(p).is_absolute() else base / p) for p in table[args.column]]
    elif args.images:
        table = pd.DataFrame({"image": args.images})
        images = list(args.images)
    else:
        raise CommandError("no images: give image paths, or --from-csv CSV --column COLUMN")

    masker = LabelsMasker(args.atlas, labels=args.labels, strategy=args.strategy)
    masker.set_output(transform="pandas").fit()
    chunk = max(1, len(images) // 50)
    show = len(images) >= 20 and not args.quiet
    start = time.perf_counter()
    parts = []
    for i in range(0, len(images), chunk):
        parts.append(masker.transform(images[i:i + chunk]))
        if show:
            _progress(min(i + chunk, len(images)), len(images), start)
    regions = pd.concat(parts, ignore_index=True)
    out = pd.concat([table.reset_index(drop=True), regions], axis=1)
    _write_table(out, args.output)
    print(f"extracted {regions.shape[1]} regions ({args.strategy}) from {len(images)} images "
          f"-> {args.output}")
    return 0


def cmd_demo(args):
    """Demo cohort -> LabelsMasker -> CombatHarmonizer -> classifier, cross-validated."""
    from kwneuro_sk.demo import run_demo

    run_demo(n_subjects=args.n_subjects, data_dir=args.data_dir, output_dir=args.output_dir,
             figure=not args.no_figure)
    return 0


# --------------------------------------------------------------------------------------------
# parser
# --------------------------------------------------------------------------------------------


def build_parser():
    parser = argparse.ArgumentParser(
        prog=PROG, description="Multi-site neuroimaging harmonization (ComBat) and region "
        "extraction, built on scikit-learn.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    demo = sub.add_parser(
        "demo", help="simulate a multi-site cohort and show what harmonization does",
        description="Build a simulated cohort of MNI-grid images (no download), extract region "
        "values, and cross-validate a diagnosis classifier with and without ComBat inside the "
        "pipeline, under StratifiedKFold and leave-one-site-out.")
    demo.add_argument("--n-subjects", type=int, default=120, help="cohort size (default 120)")
    demo.add_argument("--data-dir", help="where the cohort is cached (default: "
                      "$KWNEURO_SK_DATA or the user cache folder)")
    demo.add_argument("--output-dir", default="kwneuro_sk_demo",
                      help="where the table and figures go (default ./kwneuro_sk_demo)")
    demo.add_argument("--no-figure", action="store_true", help="do not draw figures")
    demo.set_defaults(func=cmd_demo)

    harm = sub.add_parser(
        "harmonize", help="fit ComBat on a feature table and harmonize it",
        description="Fit ComBat on FEATURES (CSV or TSV: one row per subject; the site column, "
        "covariate columns and --keep columns are not harmonized, every other column is a "
        "feature) and write the harmonized table.")
    harm.add_argument("features", metavar="FEATURES.csv")
    harm.add_argument("--batch-col", required=True, help="name of the site column")
    harm.add_argument("--categorical", nargs="+", default=[], metavar="COL",
                      help="categorical covariates whose effects are kept")
    harm.add_argument("--continuous", nargs="+", default=[], metavar="COL",
                      help="continuous covariates whose effects are kept")
    harm.add_argument("--keep", nargs="+", default=[], metavar="COL",
                      help="columns copied to the output unchanged (e.g. subject IDs)")
    harm.add_argument("--eb", action=argparse.BooleanOptionalAction, default=True,
                      help="empirical Bayes shrinkage (default: --eb)")
    kind = harm.add_mutually_exclusive_group()
    kind.add_argument("--parametric", dest="parametric", action="store_true", default=True,
                      help="parametric empirical Bayes (default)")
    kind.add_argument("--non-parametric", dest="parametric", action="store_false",
                      help="non-parametric empirical Bayes")
    harm.add_argument("--mean-only", action="store_true", help="adjust site means only")
    harm.add_argument("--ref-batch", metavar="SITE", help="reference site, left unchanged")
    harm.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    harm.add_argument("--save-model", metavar="MODEL",
                      help="save the fitted model to this file (for 'apply')")
    harm.add_argument("--smooth", nargs="+", default=[], metavar="COL",
                      help="continuous covariates modelled as smooth curves (ComBat-GAM)")
    harm.add_argument("--smooth-knots", type=int, default=5, metavar="K",
                      help="knots per smooth covariate (default 5)")
    harm.add_argument("--report", metavar="REPORT.html",
                      help="also write a self-contained HTML report (needs matplotlib)")
    harm.set_defaults(func=cmd_harmonize)

    apply = sub.add_parser(
        "apply", help="harmonize new rows with a saved model",
        description="Harmonize the rows of NEW.csv with a model saved by 'harmonize "
        "--save-model'; each row is adjusted with its own site and covariates. Columns the "
        "model was not fitted with are copied unchanged.")
    apply.add_argument("model", metavar="MODEL")
    apply.add_argument("features", metavar="NEW.csv")
    apply.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    apply.add_argument("--adapt-new-sites", action="store_true",
                       help="estimate sites unseen in fit from their rows (default: error)")
    apply.set_defaults(func=cmd_apply)

    extract = sub.add_parser(
        "extract", help="region values of images with a labels atlas",
        description="One row per image, one column per region of the atlas.")
    extract.add_argument("images", nargs="*", metavar="IMAGE", help="3D images (.nii/.nii.gz)")
    extract.add_argument("--atlas", required=True, help="labels image")
    extract.add_argument("--labels", help="look-up table (TSV with index and name columns)")
    extract.add_argument("--strategy", default="mean",
                         choices=["mean", "median", "sum", "minimum", "maximum", "variance",
                                  "standard_deviation"])
    extract.add_argument("--from-csv", metavar="CSV",
                         help="table whose --column holds the image paths; its other columns "
                         "are copied to the output")
    extract.add_argument("--column", default="image", help="image column of --from-csv")
    extract.add_argument("-o", "--output", required=True, metavar="OUT.csv")
    extract.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    extract.set_defaults(func=cmd_extract)
    return parser


def main(argv=None):
    """Run the command line; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CommandError, ValueError, TypeError, FileNotFoundError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"{PROG} {args.command}: error: {message}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
