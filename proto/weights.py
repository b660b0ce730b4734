"""The weight-version directory contract on shared storage.

``<root>/v000042/`` holds a checkpoint loadable with ``from_pretrained`` plus ``manifest.json``
(a WeightManifest: version, step, sha256 of every file). A version is written under a temporary
name, its manifest written last, then renamed into place: a reader never sees a partial version.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from proto.schemas import WeightManifest

if TYPE_CHECKING:
    import torch

MANIFEST = "manifest.json"


class WeightsError(RuntimeError):
    pass


def version_dir(root: Path, version: int) -> Path:
    return Path(root) / f"v{version:06d}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_version(root: Path, version: int, step: int, save: Callable[[Path], None]) -> WeightManifest:
    """``save(tmp_dir)`` writes the checkpoint; we checksum it, write the manifest, rename atomically."""
    final = version_dir(root, version)
    if final.exists():
        raise WeightsError(f"weight version {version} already exists at {final}")
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        save(tmp)
        files = {p.name: file_sha256(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        manifest = WeightManifest(version=version, step=step, created_at=time.time(), files=files)
        (tmp / MANIFEST).write_text(manifest.model_dump_json(indent=2))
        for p in [*tmp.iterdir(), tmp]:
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def read_manifest(path: Path) -> WeightManifest:
    """The version's manifest, files unchecked (``verify_version`` checks them)."""
    path = Path(path)
    try:
        return WeightManifest.model_validate(json.loads((path / MANIFEST).read_text()))
    except (OSError, ValueError) as exc:
        raise WeightsError(f"{path}: unreadable manifest: {exc}") from exc


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a version's safetensors shards, by name (on CPU)."""
    from safetensors.torch import load_file

    tensors: dict[str, torch.Tensor] = {}
    for shard in sorted(Path(path).glob("*.safetensors")):
        tensors |= load_file(shard)
    if not tensors:
        raise WeightsError(f"{path}: no safetensors shards")
    return tensors


def verify_version(path: Path) -> WeightManifest:
    """Raise ``WeightsError`` unless every file listed in the manifest has its recorded checksum."""
    path = Path(path)
    manifest = read_manifest(path)
    for name, digest in manifest.files.items():
        actual = file_sha256(path / name) if (path / name).exists() else "missing"
        if actual != digest:
            raise WeightsError(f"{path / name}: checksum {actual} does not match manifest {digest}")
    return manifest


def published_versions(root: Path) -> list[int]:
    root = Path(root)
    if not root.exists():
        return []
    return sorted(int(p.name[1:]) for p in root.iterdir() if p.name.startswith("v") and (p / MANIFEST).exists())


def prune(root: Path, keep: int, in_use: set[int] = frozenset()) -> list[int]:  # type: ignore[assignment]
    """Delete all but the newest ``keep`` versions, sparing any in ``in_use``; returns what was deleted.

    A version is renamed out of sight before it is deleted, the reverse of ``write_version``: a learner
    killed mid-delete leaves a hidden remnant, never a ``vNNNNNN`` directory without its manifest. Each
    prune sweeps what killed processes left: those remnants, other processes' unfinished writes and
    manifest-less versions (only an interrupted delete of an older release makes one)."""
    root = Path(root)
    remnants = list(root.glob(".v*.deleting-*"))
    remnants += [p for p in root.glob(".v*.tmp-*") if not p.name.endswith(f".tmp-{os.getpid()}")]
    remnants += [p for p in root.glob("v*") if p.is_dir() and not (p / MANIFEST).exists()]
    for remnant in remnants:
        shutil.rmtree(remnant, ignore_errors=True)
    versions = published_versions(root)
    doomed = [v for v in versions[:-keep] if v not in in_use] if keep > 0 else []
    deleted = []
    for v in doomed:
        path = version_dir(root, v)
        gone = path.with_name(f".{path.name}.deleting-{os.getpid()}-{time.monotonic_ns()}")
        try:
            os.rename(path, gone)
        except OSError:  # gone already, or the filesystem refused: the next prune tries again
            continue
        shutil.rmtree(gone, ignore_errors=True)
        deleted.append(v)
    return deleted
