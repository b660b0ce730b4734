import shutil

import pytest

from proto.weights import WeightsError, prune, published_versions, verify_version, version_dir, write_version


def save(files: dict[str, bytes]):
    def write(path):
        for name, data in files.items():
            (path / name).write_bytes(data)

    return write


def test_version_is_written_atomically_with_checksums(tmp_path):
    manifest = write_version(tmp_path, 3, 7, save({"model.safetensors": b"abc", "config.json": b"{}"}))
    assert manifest.version == 3 and manifest.step == 7 and set(manifest.files) == {"model.safetensors", "config.json"}
    assert verify_version(version_dir(tmp_path, 3)) == manifest
    assert [p.name for p in tmp_path.iterdir()] == ["v000003"]  # no temporary left behind
    with pytest.raises(WeightsError, match="already exists"):
        write_version(tmp_path, 3, 7, save({}))


def test_a_failed_save_publishes_nothing(tmp_path):
    def broken(path):
        (path / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_version(tmp_path, 1, 1, broken)
    assert published_versions(tmp_path) == [] and list(tmp_path.iterdir()) == []


def test_tampered_file_fails_verification(tmp_path):
    write_version(tmp_path, 1, 1, save({"model.safetensors": b"abc"}))
    (version_dir(tmp_path, 1) / "model.safetensors").write_bytes(b"abd")
    with pytest.raises(WeightsError, match="does not match manifest"):
        verify_version(version_dir(tmp_path, 1))


def test_prune_keeps_newest_and_spares_versions_in_use(tmp_path):
    for v in range(6):
        write_version(tmp_path, v, v, save({"w": bytes([v])}))
    assert prune(tmp_path, keep=2, in_use={1}) == [0, 2, 3]
    assert published_versions(tmp_path) == [1, 4, 5]


def test_a_prune_killed_mid_delete_leaves_no_version_without_its_manifest(tmp_path, monkeypatch):
    for v in range(3):
        write_version(tmp_path, v, v, save({"w": bytes([v]), "z": b"z"}))

    def killed(path, ignore_errors=False):  # the process dies after removing the manifest, before the rest
        (path / "manifest.json").unlink()
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", killed)
        with pytest.raises(KeyboardInterrupt):
            prune(tmp_path, keep=1)
    # what a reader lists is whole: no v000000 directory lingers without its manifest
    assert sorted(p.name for p in tmp_path.glob("v*")) == ["v000001", "v000002"]
    assert all(verify_version(p) for p in tmp_path.glob("v*"))
    # what killed processes left: an unfinished write of another process, a manifest-less version (an
    # older release's interrupted delete)
    (tmp_path / ".v000003.tmp-999999999").mkdir()
    (tmp_path / "v000000").mkdir()
    assert prune(tmp_path, keep=1) == [1]  # the next prune also clears every remnant
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v000002"]
