"""Root-level provenance: package versions, the engine's git commit, what the archive stores
about its tokenizers (the run layer turns it into `engine.archive.ModelInfo`)."""

from __future__ import annotations

import hashlib
import json
import socket
import subprocess
from importlib import metadata
from pathlib import Path

from engine.archive import format as F

PACKAGES = (
    "torch",
    "transformers",
    "transformer-lens",
    "trl",
    "numpy",
    "h5py",
    "numba",
    "hydra-core",
    "gguf",
)


def package_versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = ""
    return out


def git_commit() -> str:
    try:
        res = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=Path(__file__).parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return res.stdout.strip() if res.returncode == 0 else ""


def root_provenance() -> dict[str, str]:
    return {
        "packages": json.dumps(package_versions(), sort_keys=True),
        "git_commit": git_commit(),
        F.HOST: socket.gethostname(),
    }


def tokenizer_record(tokenizer, vocab_size: int) -> tuple[list[str], str]:
    """(display string of every id < vocab_size, tokenizer.json text or "")."""
    n = len(tokenizer)
    strings = [
        t.replace("\x00", "\u2400")  # HDF5 strings cannot hold NUL: show it as U+2400
        for t in tokenizer.batch_decode([[i] for i in range(min(n, vocab_size))])
    ]
    strings += [""] * (vocab_size - len(strings))  # ids the tokenizer never emits
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return strings, (backend.to_str() if backend is not None else "")


def sha256_file(path: str | Path, bufsize: int = 1 << 22, progress=None) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks; `progress(nbytes)` after each block."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(bufsize):
            h.update(chunk)
            if progress is not None:
                progress(len(chunk))
    return h.hexdigest()
