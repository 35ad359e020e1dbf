"""One loader, one set of errors: a bad image file fails the same way through LabelsMasker
(with and without its cache), harmonize_volumes, apply_volumes and the command line."""

import nibabel as nib
import numpy as np
import pandas as pd
import pytest

from kwneuro_sk import LabelsMasker, harmonize_volumes
from kwneuro_sk import images as _images
from kwneuro_sk.cli import main

SHAPE = (5, 5, 4)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    imgs = [nib.Nifti1Image(rng.normal(size=SHAPE).astype(np.float32), np.eye(4)) for _ in range(4)]
    nib.save(imgs[0], folder / "good.nii.gz")
    nib.save(imgs[0], folder / "good.nii")
    gz = (folder / "good.nii.gz").read_bytes()
    nii = (folder / "good.nii").read_bytes()
    (folder / "truncated.nii.gz").write_bytes(gz[: len(gz) // 2])
    (folder / "truncated.nii").write_bytes(nii[: len(nii) // 2])
    (folder / "header_cut.nii").write_bytes(nii[:200])
    (folder / "notes.nii.gz").write_text("not an image\n")
    (folder / "notes.nii").write_text("not an image\n")
    (folder / "empty.nii.gz").write_bytes(b"")
    (folder / "folder.nii.gz").mkdir()
    atlas = np.zeros(SHAPE, dtype=np.int16)
    atlas[:2], atlas[3:] = 1, 2
    covars = pd.DataFrame({"site": ["a", "b", "a", "b"]})
    mask = nib.Nifti1Image(np.ones(SHAPE, dtype=np.uint8), np.eye(4))
    _, estimates = harmonize_volumes(imgs, covars, "site", mask)
    return {
        "folder": folder,
        "imgs": imgs,
        "atlas": nib.Nifti1Image(atlas, np.eye(4)),
        "covars": covars,
        "mask": mask,
        "estimates": estimates,
    }


def _entry_points(files, tmp_path):
    imgs, covars, mask = files["imgs"], files["covars"], files["mask"]
    return {
        "masker": lambda p: LabelsMasker(files["atlas"]).fit().transform([p]),
        "masker with memory": lambda p: (
            LabelsMasker(files["atlas"], memory=tmp_path / "cache").fit().transform([p])
        ),
        "masker atlas": lambda p: LabelsMasker(p).fit(),
        "harmonize_volumes": lambda p: harmonize_volumes([p, *imgs[1:]], covars, "site", mask),
        "harmonize_volumes mask": lambda p: harmonize_volumes(imgs, covars, "site", p),
        "apply_volumes": lambda p: files["estimates"].apply_volumes([p], covars[:1]),
    }


BAD = [
    "truncated.nii.gz",
    "truncated.nii",
    "header_cut.nii",
    "notes.nii.gz",
    "notes.nii",
    "empty.nii.gz",
    "folder.nii.gz",
]
ENTRY_POINTS = [
    "masker",
    "masker with memory",
    "masker atlas",
    "harmonize_volumes",
    "harmonize_volumes mask",
    "apply_volumes",
]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", BAD)
def test_unreadable_file_is_a_value_error_naming_it(files, tmp_path, entry, name):
    call = _entry_points(files, tmp_path)[entry]
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        call(str(files["folder"] / name))


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_missing_file_is_file_not_found_naming_it(files, tmp_path, entry):
    call = _entry_points(files, tmp_path)[entry]
    with pytest.raises(FileNotFoundError, match=r"missing\.nii\.gz"):
        call(str(files["folder"] / "missing.nii.gz"))


def test_directory_is_not_reported_as_missing(files, tmp_path):
    with pytest.raises(ValueError, match="is a directory"):
        LabelsMasker(files["atlas"]).fit().transform([str(files["folder"] / "folder.nii.gz")])


@pytest.mark.parametrize(
    "name", ["truncated.nii.gz", "truncated.nii", "notes.nii", "missing.nii", "folder.nii.gz"]
)
def test_cli_extract_one_line_naming_the_file(files, tmp_path, capsys, name):
    nib.save(files["atlas"], tmp_path / "atlas.nii.gz")
    code = main(
        [
            "extract",
            str(files["folder"] / name),
            "--atlas",
            str(tmp_path / "atlas.nii.gz"),
            "-o",
            str(tmp_path / "out.csv"),
        ]
    )
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert name in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("memory", [False, True])
def test_misnamed_compression_reads_the_same_with_and_without_cache(files, tmp_path, memory):
    """gzip is recognised by its bytes: a .nii that is compressed, or a .nii.gz that is not,
    reads the same through both routes of the masker."""
    import shutil

    folder = files["folder"]
    shutil.copy(folder / "good.nii.gz", tmp_path / "compressed.nii")
    shutil.copy(folder / "good.nii", tmp_path / "plain.nii.gz")
    masker = LabelsMasker(files["atlas"], memory=tmp_path / "cache" if memory else None).fit()
    expected = masker.transform([files["imgs"][0]])
    got = masker.transform([str(tmp_path / "compressed.nii"), str(tmp_path / "plain.nii.gz")])
    np.testing.assert_allclose(got, np.vstack([expected, expected]), rtol=1e-6)


@pytest.mark.parametrize("isal", [True, False])
def test_gunzip_builds_the_output_once_and_handles_several_members(isal, monkeypatch):
    import gzip
    import tracemalloc

    if not isal:
        monkeypatch.setattr(_images, "_igzip", None)
    elif _images._igzip is None:
        pytest.skip("isal is not installed")
    payload = np.random.default_rng(0).standard_normal(1_000_000).tobytes()  # 8 MB
    raw = gzip.compress(payload, compresslevel=1)
    tracemalloc.start()
    out = _images.gunzip(raw)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert out == payload
    assert peak < 1.2 * len(payload)  # one output buffer, not grown by copies
    members = gzip.compress(payload[:1000]) + gzip.compress(payload[1000:5000])
    assert _images.gunzip(members) == payload[:5000]  # the trailing member is not dropped
    with pytest.raises((EOFError, gzip.BadGzipFile, OSError)):
        _images.gunzip(raw[: len(raw) // 2])


def test_file_digest_is_remembered_until_the_file_is_rewritten(tmp_path, monkeypatch):
    """One content key for every cache (masker, extractor): SHA-256 of the bytes, read in
    blocks with keep_bytes=False, remembered per file state for the process and, with
    store=, across processes; any write makes the file read and hashed again."""
    import hashlib
    import os

    path = tmp_path / "run.nii.gz"
    path.write_bytes(b"first version")
    digest, raw = _images.file_digest(path, keep_bytes=False)
    assert digest == hashlib.sha256(b"first version").hexdigest() and raw is None
    reads = []
    real_read = _images.read_file_bytes
    monkeypatch.setattr(
        _images, "read_file_bytes", lambda *a, **k: reads.append(a) or real_read(*a, **k)
    )
    monkeypatch.setattr(_images, "_streamed_digest", lambda *a: pytest.fail("read again"))
    assert _images.file_digest(path) == (digest, None)  # unchanged: not read
    assert reads == []
    monkeypatch.undo()
    path.write_bytes(b"other version")  # moves the change time, even at the same mtime
    stat = os.stat(path)
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    other, raw = _images.file_digest(path)
    assert other == hashlib.sha256(b"other version").hexdigest() and raw == b"other version"
    # across processes: the store folder's memo serves a process that has not hashed it
    store = tmp_path / "store"
    _images.file_digest(path, store=store)
    _images._DIGESTS.clear()
    monkeypatch.setattr(_images, "read_file_bytes", lambda *a, **k: pytest.fail("read again"))
    assert _images.file_digest(path, store=store) == (other, None)
    monkeypatch.undo()
    with pytest.raises(FileNotFoundError, match="run file not found"):
        _images.file_digest(tmp_path / "gone.nii.gz", name="run", keep_bytes=False)
    with pytest.raises(ValueError, match="is a directory"):
        _images.file_digest(tmp_path, name="run", keep_bytes=False)
