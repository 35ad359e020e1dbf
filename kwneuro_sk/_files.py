"""All-or-nothing writes of one call (streamed volumes, the command line).

:class:`StagedFiles` checks every output before the first write (its folder can be made and
written to, the name is not a folder, not an input), has each output written to a temporary
file next to its target, and renames them all over their targets only when every output is
ready. When anything fails on the way, the temporary files, and the folders this call created,
are removed, and the error says so: a failed call leaves the outputs as they were before it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path


def default_file_mode():
    """The mode ``open(path, "w")`` would give a new file (0666 less the umask)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


class StagedFiles:
    """The outputs of one call, written to temporary files and committed together.

    Parameters
    ----------
    caller : str
        Named in messages (``"harmonize_volumes"``, ``"kwneuro-sk harmonize"``).
    error : type, default=ValueError
        Exception raised for an output that cannot be written.

    Use as a context manager: :meth:`check` every output, :meth:`path_for` each while writing,
    then :meth:`commit`; leaving the block without a commit removes what was staged.
    """

    def __init__(self, caller, error=ValueError):
        self.caller = caller
        self.error = error
        self._pending = []  # (temporary, target)
        self._created = []  # folders this call made, outermost first
        self._written = []  # targets renamed so far by commit

    # -- before the first write ---------------------------------------------------------------

    def make_folder(self, folder, what):
        """Create ``folder`` (and its parents) if needed and check that files can be made
        in it, or raise naming ``what``."""
        folder = Path(os.path.abspath(os.fspath(folder)))
        blocking = next(
            (p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None
        )
        if blocking is not None:
            raise self.error(
                f"cannot create {what} {os.fspath(folder)!r}: {os.fspath(blocking)!r} is a file "
                "(a file is in the way)"
            )
        missing = [p for p in [folder, *folder.parents] if not p.exists()][::-1]
        for path in missing:
            try:
                path.mkdir()
            except FileExistsError:
                continue
            except OSError as exc:
                raise self.error(
                    f"cannot create {what} {os.fspath(folder)!r}: {exc.strerror or exc}"
                ) from None
            self._created.append(path)
        try:
            fd, probe = tempfile.mkstemp(prefix=".kwneuro_sk.", suffix=".probe", dir=folder)
            os.close(fd)
            os.unlink(probe)
        except OSError as exc:
            raise self.error(
                f"cannot write in {what} {os.fspath(folder)!r}: {exc.strerror or exc}"
            ) from None

    def check(self, target, what, inputs=()):
        """Refuse ``target`` when it is a folder or one of ``inputs`` ({description: path})."""
        target = Path(target)
        if target.is_dir():
            raise self.error(
                f"{what} {os.fspath(target)!r} is a folder; remove it or choose another name"
            )
        resolved = target.resolve()
        for description, source in dict(inputs).items():
            if source is None:
                continue
            same = Path(source).resolve() == resolved
            if not same and target.exists() and Path(source).exists():
                same = os.path.samefile(target, source)
            if same:
                raise self.error(
                    f"{what} {os.fspath(target)!r} is the {description}; inputs are never "
                    "overwritten: write the output elsewhere"
                )

    # -- writing ------------------------------------------------------------------------------

    def path_for(self, target):
        """A temporary file next to ``target`` (same extension), committed over it later."""
        target = Path(target)
        name = target.name
        extension = next(
            (e for e in (".nii.gz", ".nii", ".csv", ".tsv", ".html", ".npz") if name.endswith(e)),
            "",
        )
        fd, temporary = tempfile.mkstemp(
            prefix=f".{name}.", suffix=f".tmp{extension}", dir=target.resolve().parent
        )
        os.close(fd)
        self._pending.append((temporary, target))
        return temporary

    def commit(self):
        """Rename every staged file over its target."""
        mode = default_file_mode()
        for temporary, target in self._pending:
            os.chmod(temporary, mode)  # mkstemp makes it private (0600)
            os.replace(temporary, target)
            self._written.append(target)
        self._pending, self._written, self._created = [], [], []

    # -- on failure ---------------------------------------------------------------------------

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, traceback):
        removed = len(self._pending) + len(self._written)
        for temporary, _ in self._pending:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
        for target in self._written:  # a failed commit: undo what it renamed
            with contextlib.suppress(OSError):
                os.unlink(target)
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when empty
        if exc is not None and isinstance(exc, Exception):
            parts = [f"{removed} unfinished output file(s)"] if removed else []
            parts += ["the folder(s) it created"] if self._created else []
            detail = f" ({' and '.join(parts)} removed)" if parts else ""
            exc.add_note(f"{self.caller}: nothing was written{detail}")
        self._pending, self._written, self._created = [], [], []
        return False
