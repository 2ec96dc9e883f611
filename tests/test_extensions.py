"""rlvr_optim.extensions: the first-use build writes the cache through rlvr_optim.files (a
build folder of its own, removed whatever happens; the module renamed into place), one
build per folder at a time. Fake builds stand in for the compiler."""

import os

import pytest

from rlvr_optim import extensions


def _extension(build):
    return extensions.Extension(
        "_fake", 1, (), hashed=lambda src: [], blockers=lambda: [], build=build,
        key=lambda: "test", hint="")


def _cache_files(root):
    return sorted(os.path.relpath(os.path.join(d, f), root)
                  for d, _, names in os.walk(root) for f in names)


def test_a_failed_build_leaves_no_module_and_no_build_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_OPTIM_CACHE", str(tmp_path))
    seen = {}

    def build(src, build_dir, target, include):
        seen["build_dir"] = build_dir
        target.write_bytes(b"half a module")
        raise RuntimeError("compiling rlvr_optim._fake failed: the compiler was killed")

    ext = _extension(build)
    with pytest.raises(RuntimeError, match="compiler was killed"):
        ext.load()
    assert seen["build_dir"].parent.parent == tmp_path / "fake_ext"
    assert [os.path.basename(f) for f in _cache_files(tmp_path)] == [".lock"]
    with pytest.raises(RuntimeError, match="compiler was killed"):  # not retried
        ext.load()


def test_a_built_module_reaches_the_cache_whole_and_the_build_folder_goes(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_OPTIM_CACHE", str(tmp_path))
    payload = os.urandom(3000)

    def build(src, build_dir, target, include):
        (build_dir / "step.o").write_bytes(b"object")
        target.write_bytes(payload)

    with pytest.raises(ImportError):  # the bytes are not a module; they were installed whole
        _extension(build).load()
    files = _cache_files(tmp_path)
    module = extensions.module_file("_fake")
    assert [os.path.basename(f) for f in files] == [".lock", module]
    assert (tmp_path / files[1]).read_bytes() == payload


def test_a_second_load_reuses_the_cached_module_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("RLVR_OPTIM_CACHE", str(tmp_path))
    builds = []

    def build(src, build_dir, target, include):
        builds.append(1)
        target.write_bytes(b"not a module")

    for _ in range(2):
        with pytest.raises(ImportError):
            _extension(build).load()
    assert builds == [1]
