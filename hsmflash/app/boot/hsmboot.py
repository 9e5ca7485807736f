# hsmboot: the hsmflash boot verifier, frozen into the firmware so Secure Boot covers it.
#
# MicroPython source (also MicroPython 1.11 for Pycom: no f-strings, no walrus). At boot it
# finds the signed app image (format hsmflash-app-v1) in the `romfs` partition, verifies its
# Secure Boot V2 signature sector (RSA-3072-PSS, SHA-256, MGF1-SHA-256, salt 32) against the
# pinned public key, the descriptor's ROMFS SHA-256 and the minimum app version, mounts the
# ROMFS at /rom, limits sys.path to frozen code and /rom, turns off Ctrl-C, runs `main` and
# resets on ANY failure (and when the app returns): it never falls through to a REPL.
#
# Hardware access is a small seam (`Esp32`, `PycomFile`) so tests feed it bytes. The pinned
# key and minimum version come from the generated module `hsmboot_key` (hsmflash app bootcode).

import sys

# "u" names always resolve to the built-in module; a plain `hashlib`, `os` or `io` could be a
# file on the filesystem (MicroPython 1.11 weak links, extensible built-ins today)
import uhashlib as hashlib

MAGIC = b"HFAPP\x01"
ROMFS_MAGIC = b"\xd2\xcd\x31"
SECTOR = 4096
BLOCK = 1216
RSA_LEN = 384
FS_ROMFS = 1


class BootError(Exception):
    pass


def _sha256(data):
    return hashlib.sha256(data).digest()


def _u32(data, at):
    return data[at] | data[at + 1] << 8 | data[at + 2] << 16 | data[at + 3] << 24


def romfs_length(head):
    # total length of a ROMFS image from its header: magic, then a 7-bit big-endian varuint
    if bytes(head[:3]) != ROMFS_MAGIC:
        raise BootError("romfs partition holds no ROMFS image")
    value = 0
    i = 3
    while True:
        if i >= 12:
            raise BootError("ROMFS header is corrupt")
        b = head[i]
        value = (value << 7) | (b & 0x7F)
        i += 1
        if not b & 0x80:
            return i + value


def mgf1_sha256(seed, length):
    out = b""
    counter = 0
    while len(out) < length:
        out += _sha256(seed + bytes((counter >> 24, (counter >> 16) & 255,
                                     (counter >> 8) & 255, counter & 255)))
        counter += 1
    return out[:length]


def pss_verify(n, e, digest, s):
    # RFC 8017 RSASSA-PSS-VERIFY for a 3072-bit modulus: emBits 3071, emLen 384, SHA-256, salt 32;
    # `s` is the signature as an integer
    if s >= n:
        return False
    em = pow(s, e, n).to_bytes(RSA_LEN, "big")
    if em[-1] != 0xBC or em[0] & 0x80:
        return False
    db_len = RSA_LEN - 32 - 1
    masked, h = em[:db_len], em[db_len:db_len + 32]
    mask = mgf1_sha256(h, db_len)
    db = bytearray(db_len)
    for i in range(db_len):
        db[i] = masked[i] ^ mask[i]
    db[0] &= 0x7F
    ps_len = db_len - 32 - 1
    for i in range(ps_len):
        if db[i]:
            return False
    if db[ps_len] != 1:
        return False
    salt = bytes(db[ps_len + 1:])
    return _sha256(b"\x00" * 8 + digest + salt) == h


def _check_blocks(sector, n, e, digest):
    # SBv2 RSA block: magic E7, version 02, 2 pad, 32-byte digest, n (LE), e, R^2 mod n, n', sig.
    # The block CRC is not checked: it guards against flash errors, and the fields that matter
    # (key material compared byte for byte, digest, signature) are checked themselves.
    n_le = n.to_bytes(RSA_LEN, "little")
    seen = []
    for k in range(3):
        blk = sector[k * BLOCK:(k + 1) * BLOCK]
        if blk[0] != 0xE7:
            break
        if blk[1] != 0x02:
            seen.append("block %d is not RSA-3072" % k)
            continue
        if bytes(blk[36:36 + RSA_LEN]) != n_le or _u32(blk, 420) != e:
            seen.append("block %d is for another key" % k)
            continue
        if bytes(blk[4:36]) != digest:
            seen.append("block %d digest does not match the image" % k)
            continue
        signature = int.from_bytes(bytes(blk[812:812 + RSA_LEN]), "little")
        if pss_verify(n, e, digest, signature):
            return k
        seen.append("block %d signature is invalid" % k)
    if not seen:
        raise BootError("app image is not signed")
    raise BootError("; ".join(seen))


def verify(readinto, size, n, e, min_version, mpy_version=None):
    """Verify the app image at offset 0 of a partition of `size` bytes; `readinto(offset, buf)`
    fills `buf` (4 KiB, 4 KiB-aligned offsets) from the partition. Four 4 KiB buffers, however
    large the image. Returns (app version, ROMFS length); raises BootError naming the first
    problem."""
    if size < 3 * SECTOR:
        raise BootError("app image truncated (or romfs partition too small): %d bytes" % size)
    buf = bytearray(SECTOR)
    readinto(0, buf)
    length = romfs_length(buf)
    padded = (length + SECTOR - 1) // SECTOR * SECTOR
    if padded + 2 * SECTOR > size:
        raise BootError("app image truncated: ROMFS of %d bytes, descriptor and signature "
                        "need %d bytes, the partition has %d" % (length, padded + 2 * SECTOR, size))
    desc = bytearray(SECTOR)
    readinto(padded, desc)
    if bytes(desc[:6]) != MAGIC:
        raise BootError("no hsmflash-app-v1 descriptor after the ROMFS image")
    version = _u32(desc, 6)
    if _u32(desc, 10) != length:
        raise BootError("descriptor length does not match the ROMFS header")
    romfs_digest = bytes(desc[14:46])
    if desc[47] != FS_ROMFS:
        raise BootError("descriptor names an unknown filesystem type")
    if mpy_version is not None and desc[46] != mpy_version:
        raise BootError("app is .mpy v%d, this firmware loads v%d" % (desc[46], mpy_version))
    if version < min_version:
        raise BootError("app version %d is below the minimum %d" % (version, min_version))
    sector = bytearray(SECTOR)
    readinto(padded + SECTOR, sector)
    # one pass over the signed content: SHA-256 of everything before the signature sector, and
    # of the ROMFS image alone (the descriptor's digest)
    whole = hashlib.sha256()
    romfs = hashlib.sha256()
    view = memoryview(buf)
    offset = 0
    while offset < padded:
        if offset:
            readinto(offset, buf)
        whole.update(buf)
        if offset + SECTOR <= length:
            romfs.update(buf)
        elif offset < length:
            romfs.update(view[:length - offset])
        offset += SECTOR
    whole.update(desc)
    _check_blocks(sector, n, e, whole.digest())
    if romfs.digest() != romfs_digest:
        raise BootError("ROMFS SHA-256 does not match the descriptor")
    return version, length


def firmware_mpy_version():
    impl = getattr(sys.implementation, "_mpy", None)
    if impl is None:
        return None  # MicroPython 1.11 does not say; Pycom's loads .mpy v4
    return impl & 0xFF


class Esp32:
    """Upstream MicroPython (>= 1.25) on ESP32 chips: the `romfs` data partition, read through
    the MMU (decrypted when flash encryption is on), mounted with vfs.VfsRom."""

    frozen_path = [".frozen"]
    import_path = [".frozen", "/rom", "/rom/lib"]

    def __init__(self, label="romfs"):
        import esp32

        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label=label)
        if not found:
            raise BootError("no %r partition in the partition table" % label)
        self.part = found[0]
        self.block = self.part.ioctl(5, 0) or SECTOR  # block size
        self._size = self.part.ioctl(4, 0) * self.block  # block count

    def size(self):
        return self._size

    def readinto(self, offset, buf):
        self.part.readblocks(offset // self.block, buf)

    def mount(self, length):
        import vfs

        # the firmware may already have mounted this partition, unverified, at /rom
        try:
            vfs.umount("/rom")
        except OSError:
            pass
        rom = vfs.rom_ioctl(2, 0)  # memoryview of the romfs segment (this partition)
        vfs.mount(vfs.VfsRom(memoryview(rom)[:length]), "/rom")

    def mount_data(self):
        # the writable LittleFS `vfs` partition at "/", as the port's own _boot.py does; it is
        # data only (never on sys.path). Not formatted here: provisioning writes it formatted.
        import esp32
        import vfs

        found = esp32.Partition.find(esp32.Partition.TYPE_DATA, label="vfs")
        if found:
            try:
                vfs.mount(vfs.VfsLfs2(found[0]), "/")
            except OSError as exc:
                print("hsmboot: data partition not mounted:", exc)

    def lock_console(self):
        lock_console()

    def reset(self, reason):
        print("hsmboot: reset:", reason)
        import machine

        machine.reset()


class PycomFile:
    """Pycom firmware (MicroPython 1.11, FiPy): no vfs.VfsRom and no esp32.Partition, so the
    signed image is read from a file (default /flash/app.img), verified, held in RAM and served
    by `RomUserFS`, a read-only user filesystem over the verified bytes."""

    # 1.11 has no ".frozen" entry: it looks for frozen modules first under each entry, so ""
    # finds them (and, after the mount, cwd /rom the app)
    frozen_path = [""]
    import_path = ["", "/rom/lib"]
    root = "/"

    def __init__(self, path="/flash/app.img"):
        import uos

        try:
            self._size = uos.stat(path)[6]
        except OSError:
            raise BootError("app image %s not found" % path)
        self.path = path
        self.data = None

    def size(self):
        return self._size

    def readinto(self, offset, buf):
        if self.data is None:
            with open(self.path, "rb") as f:
                self.data = f.read()
        buf[:] = memoryview(self.data)[offset:offset + len(buf)]

    def mount(self, length):
        import uos

        uos.mount(RomUserFS(memoryview(self.data)[:length]), "/rom")
        uos.chdir("/rom")

    def lock_console(self):
        import uos

        uos.chdir(self.root)  # "" in sys.path must not reach /flash; /rom once mounted
        lock_console()
        try:  # Pycom's Telnet and FTP servers (default logins)
            import network

            network.Server().deinit()
        except (ImportError, AttributeError, OSError):
            pass

    def reset(self, reason):
        print("hsmboot: reset:", reason)
        import machine

        machine.reset()


def lock_console():
    import micropython

    micropython.kbd_intr(-1)  # Ctrl-C no longer interrupts the app
    try:
        import uos

        for index in range(2):  # detach duplicated terminals (WebREPL, Telnet) where allowed
            uos.dupterm(None, index)
    except (AttributeError, TypeError, ValueError, OSError):
        pass  # this firmware has no dupterm; the REPL is closed by its build config


def _varuint(buf, i):
    value = 0
    while True:
        b = buf[i]
        value = (value << 7) | (b & 0x7F)
        i += 1
        if not b & 0x80:
            return value, i


def _romfs_tree(buf, start, end, top):
    # ROMFS records: kind, length, payload (kinds: 1 padding, 2 data, 3 pointer, 4 dir, 5 file)
    entries = {}
    i = start
    while i < end:
        kind, i = _varuint(buf, i)
        size, i = _varuint(buf, i)
        body_end = i + size
        if kind in (4, 5):
            name_len, j = _varuint(buf, i)
            name = str(bytes(buf[j:j + name_len]), "ascii")
            j += name_len
            if kind == 4:
                entries[name] = _romfs_tree(buf, j, body_end, top)
            else:
                dkind, j = _varuint(buf, j)
                dsize, j = _varuint(buf, j)
                if dkind == 3:  # pointer into the image: offset, length
                    off, j = _varuint(buf, j)
                    ln, j = _varuint(buf, j)
                    entries[name] = top[off:off + ln]
                else:
                    entries[name] = buf[j:j + dsize]
        i = body_end
    return entries


class RomUserFS:
    """A read-only filesystem over verified ROMFS bytes, for firmware without vfs.VfsRom."""

    def __init__(self, image):
        header = romfs_length(image)
        _, start = _varuint(image, 3)
        self.root = _romfs_tree(image, start, header, image)

    def _find(self, path):
        node = self.root
        for part in path.split("/"):
            if not part:
                continue
            if not isinstance(node, dict) or part not in node:
                raise OSError(2)  # ENOENT
            node = node[part]
        return node

    def mount(self, readonly, mkfs):
        pass

    def umount(self):
        pass

    def chdir(self, path):
        if not isinstance(self._find(path), dict):
            raise OSError(20)  # ENOTDIR
        self.cwd = path

    def getcwd(self):
        return getattr(self, "cwd", "/")

    def ilistdir(self, path):
        node = self._find(path)
        for name in node:
            yield (name, 0x4000 if isinstance(node[name], dict) else 0x8000, 0)

    def stat(self, path):
        node = self._find(path)
        if isinstance(node, dict):
            return (0x4000, 0, 0, 0, 0, 0, 0, 0, 0, 0)
        return (0x8000, 0, 0, 0, 0, 0, len(node), 0, 0, 0)

    def statvfs(self, path):
        return (SECTOR, SECTOR, 0, 0, 0, 0, 0, 0, 0, 255)

    def open(self, path, mode):
        if "w" in mode or "a" in mode or "+" in mode:
            raise OSError(30)  # EROFS
        import uio

        node = self._find(path)
        if isinstance(node, dict):
            raise OSError(21)  # EISDIR
        data = bytes(node)
        return uio.BytesIO(data) if "b" in mode else uio.StringIO(str(data, "utf-8"))


def _run(hw, n, e, min_version):
    sys.path[:] = hw.frozen_path  # nothing outside the firmware is importable until verified
    hw.lock_console()
    version, length = verify(hw.readinto, hw.size(), n, e, min_version, firmware_mpy_version())
    hw.mount(length)
    if hasattr(hw, "mount_data"):
        hw.mount_data()
    sys.path[:] = hw.import_path
    __import__("main")
    return "app returned"


def boot(hw, n, e, min_version):
    """Verify, mount and run the app; reset through `hw` on any failure and when it ends."""
    try:
        reason = _run(hw, n, e, min_version)
    except BaseException as exc:  # noqa: BLE001 - any failure resets, never a REPL
        reason = "%s: %s" % (type(exc).__name__, exc)
    hw.reset(reason)


def main(variant="upstream"):
    try:
        import hsmboot_key as key

        hw = PycomFile() if variant == "pycom" else Esp32()
    except BaseException as exc:  # noqa: BLE001
        import machine

        print("hsmboot: reset:", exc)
        machine.reset()
        return
    boot(hw, key.N, key.E, key.MIN_VERSION)
