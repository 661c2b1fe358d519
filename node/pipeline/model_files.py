"""A model's files and their digest. An nnU-Net checkpoint is a pickle, so loading one runs code: the
files are hashed, and compared with the configured `sha256`, before anything is unpickled."""

from __future__ import annotations

import hashlib
from pathlib import Path

from node.errors import UserError

_CHUNK = 1 << 20


class ModelFileError(UserError):
    """A model's files are missing or are not the ones configured."""


def digested_files(path: Path) -> list[Path]:
    """What the digest covers: a file (safetensors weights, an exported nnU-Net zip) is itself; an nnU-Net
    model folder is its top-level JSON files and every fold's checkpoints (`fold_*/*.pth`): everything
    a worker reads, and nothing it does not (training logs, validation outputs)."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise ModelFileError(f"model path {path} does not exist")
    files = sorted(path.glob("*.json")) + sorted(path.glob("fold_*/*.pth"))
    if not files:
        raise ModelFileError(f"{path} holds no model files (*.json, fold_*/*.pth)")
    return files


def file_digest(file: Path) -> str:
    """SHA-256 of one file, hex, read in chunks."""
    digest = hashlib.sha256()
    with file.open("rb") as stream:
        while chunk := stream.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def model_digest(path: Path) -> str:
    """SHA-256, hex: a file's own digest; a folder's, that of a manifest with one line per file, its path
    relative to the folder and its own digest (`sha256sum`'s format, sorted)."""
    files = digested_files(path)
    if files == [path]:
        return file_digest(path)
    manifest = "".join(f"{file_digest(file)}  {file.relative_to(path).as_posix()}\n" for file in files)
    return hashlib.sha256(manifest.encode()).hexdigest()


def verify_digest(path: Path, expected: str, model_name: str) -> None:
    """Raises ModelFileError unless the files at `path` hash to `expected` (hex, any case)."""
    actual = model_digest(path)
    if actual != expected.lower():
        raise ModelFileError(
            f"model {model_name}: the files at {path} hash to sha256 {actual}, not the configured {expected}: "
            "not loaded (a checkpoint is code; `rtnode models digest PATH` prints a path's digest)"
        )
