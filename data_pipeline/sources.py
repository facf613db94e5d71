"""Find out which raw layout a folder uses and turn it into a list of candidates.

Three layouts are accepted (see ``LAYOUTS``); the first that fits wins, in this order:

1. a ``.jsonl`` file given directly, or a folder with ``metadata.csv`` / ``metadata.jsonl``;
2. a folder holding exactly one other ``*.jsonl`` at its top level (a data-juicer dataset);
3. a folder with images anywhere below it and kohya-style sidecar captions (``a.png`` + ``a.txt``;
   an image without one is kept with the empty caption).

Reading never fails on a single bad row or file: such a candidate carries a ``problem`` and is
dropped later with that reason. Only a folder we cannot interpret at all is an error.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from data_pipeline.candidates import IMAGE_SUFFIXES, Candidate, clean_caption, rows_to_candidates
from data_pipeline.errors import PipelineError
from data_pipeline.jsonl_sources import is_dj_jsonl, read_dj_jsonl, read_metadata_jsonl

CAPTION_SUFFIXES = (".txt", ".TXT")
LAYOUTS = (
    "accepted layouts:\n"
    "  1. images with sidecar captions: a.png + a.txt next to it (subfolders allowed)\n"
    "  2. a folder with metadata.csv or metadata.jsonl (columns file_name,text; paths relative to the folder)\n"
    '  3. a data-juicer .jsonl file, or a folder holding exactly one *.jsonl ({"text": ..., "images": [path]})'
)


@dataclass
class RawInput:
    """Everything read from RAW: which layout it used, the file read, and the candidates."""

    form: str
    source: Path
    candidates: list[Candidate]


def _walk(root: Path) -> list[str]:
    """Every non-hidden file below ``root`` as a sorted POSIX path relative to it."""
    found = []
    for dirpath, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(root)
        found.extend((rel_dir / f).as_posix() for f in files if not f.startswith("."))
    return sorted(found)


def _read_caption_file(path: Path) -> tuple[str | None, tuple[str, str] | None]:
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError:
        return None, ("unreadable caption", f"{path.name} is not UTF-8 text")
    return clean_caption(text)


def read_sidecar(root: Path) -> list[Candidate]:
    """Kohya layout: each image's caption is the text file with the same stem next to it."""
    files = _walk(root)
    present = set(files)
    out = []
    for rel in files:
        suffix = PurePosixPath(rel).suffix
        if suffix in CAPTION_SUFFIXES:
            continue
        stem = rel[: len(rel) - len(suffix)] if suffix else rel
        caption_rel = next((stem + s for s in CAPTION_SUFFIXES if stem + s in present), None)
        path = root / rel
        if suffix.lower() not in IMAGE_SUFFIXES:
            if caption_rel is not None:  # captioned, so meant as training data, but unusable
                out.append(Candidate(rel, path, None, None, ("unsupported file type", f"{suffix or 'no suffix'}")))
            continue
        if caption_rel is None:  # kohya trains such an image with the empty caption; so do we
            out.append(Candidate(rel, path, "", rel))
            continue
        caption, problem = _read_caption_file(root / caption_rel)
        out.append(Candidate(rel, path, caption, rel, problem))
    return out


def read_metadata_csv(meta: Path) -> list[Candidate]:
    """diffusers imagefolder layout with ``metadata.csv`` (rows numbered as in a spreadsheet)."""
    try:
        with open(meta, encoding="utf-8-sig", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = list(reader.fieldnames or [])
            rows = list(reader)
    except UnicodeDecodeError as err:
        raise PipelineError(f"{meta} is not UTF-8 text (byte {err.start}). Fix: save it as UTF-8.") from None
    except csv.Error as err:
        raise PipelineError(f"could not read {meta}: {err}.") from None
    missing = [c for c in ("file_name", "text") if c not in columns]
    if missing:
        raise PipelineError(
            f"{meta} has no {' or '.join(repr(c) for c in missing)} column (found: {columns}). "
            "Fix: name the image column 'file_name' and the caption column 'text'."
        )
    return rows_to_candidates(meta, ((n, row) for n, row in enumerate(rows, start=2)), "row")


def _no_layout(root: Path, detail: str) -> PipelineError:
    return PipelineError(f"RAW folder {root} {detail}.\n{LAYOUTS}")


def read_raw(raw: str | os.PathLike) -> RawInput:
    """Detect RAW's layout and read it (see the module docstring for the order)."""
    found = _detect_and_read(raw)
    if not found.candidates:
        raise PipelineError(f"{found.source} lists no images. Fix: add one entry per image and caption.")
    return found


def _detect_and_read(raw: str | os.PathLike) -> RawInput:
    root = Path(os.path.abspath(os.path.expanduser(raw)))
    if not root.exists():
        raise PipelineError(f"RAW {root} does not exist.\n{LAYOUTS}")
    if root.is_file():
        if root.suffix.lower() != ".jsonl":
            raise PipelineError(f"RAW {root} is a file but not a .jsonl dataset.\n{LAYOUTS}")
        if root.name == "metadata.jsonl" and not is_dj_jsonl(root):
            return RawInput("metadata.jsonl", root, read_metadata_jsonl(root))
        return RawInput("data-juicer jsonl", root, read_dj_jsonl(root))
    metas = [root / n for n in ("metadata.csv", "metadata.jsonl") if (root / n).is_file()]
    if len(metas) > 1:
        raise PipelineError(f"RAW folder {root} has both metadata.csv and metadata.jsonl; keep one of them.")
    if metas:
        meta = metas[0]
        if meta.suffix == ".jsonl" and is_dj_jsonl(meta):  # the seeds' file: data-juicer rows, imagefolder name
            return RawInput("data-juicer jsonl", meta, read_dj_jsonl(meta))
        reader = read_metadata_csv if meta.suffix == ".csv" else read_metadata_jsonl
        return RawInput(meta.name, meta, reader(meta))
    jsonls = sorted(p for p in root.glob("*.jsonl") if p.is_file() and not p.name.startswith("."))
    if len(jsonls) > 1:
        names = ", ".join(p.name for p in jsonls)
        raise _no_layout(root, f"holds several .jsonl files ({names}); pass the one to use as RAW")
    if jsonls:
        return RawInput("data-juicer jsonl", jsonls[0], read_dj_jsonl(jsonls[0]))
    files = _walk(root)
    if not files:
        raise PipelineError(f"RAW folder {root} is empty: no files to clean.\n{LAYOUTS}")
    candidates = read_sidecar(root)
    if not candidates:
        raise _no_layout(root, f"has {len(files)} file(s) but no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return RawInput("sidecar captions", root, candidates)
