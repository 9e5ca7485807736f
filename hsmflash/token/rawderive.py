"""Batch per-device derivation (aes-ecb-v1) through the module's C API, for KCV manifests.

python-pkcs11 builds a new Python class for every object handle it returns (about 0.2 ms), which
caps `Station.derive` at roughly 1,000 devices per second on SoftHSM. A factory that derives the
KCVs of a whole production lot does not need Python objects for keys it destroys at once, so this
path calls C_DeriveKey / C_EncryptInit / C_Encrypt / C_DestroyObject directly (ctypes) on a
session python-pkcs11 opened and logged in. Same mechanism, same template, same results (the
tests compare both paths); the derived keys are session objects, sensitive, never extractable,
destroyed before the next device. Large lots are split across worker processes, each with its
own session.

Only used for KCVs; anything that encrypts goes through `Station.derive`.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

from pkcs11 import Attribute, KeyType, Mechanism, ObjectClass

from hsmflash.errors import TokenError
from hsmflash.formats import kdf

if TYPE_CHECKING:
    import pkcs11._pkcs11
    import pkcs11.types as p11t

_ZERO16 = (ctypes.c_ubyte * 16)()
_CKR_MECHANISM_INVALID = 0x70


class _Mechanism(ctypes.Structure):
    _fields_ = (("mechanism", ctypes.c_ulong), ("parameter", ctypes.c_void_p),
                ("parameter_len", ctypes.c_ulong))


class _DerivationString(ctypes.Structure):
    _fields_ = (("data", ctypes.c_char_p), ("length", ctypes.c_ulong))


_CValue = ctypes.c_ubyte | ctypes.c_ulong  # an attribute value in a C template


class _Attribute(ctypes.Structure):
    _fields_ = (("type", ctypes.c_ulong), ("value", ctypes.c_void_p),
                ("value_len", ctypes.c_ulong))


# CK_FUNCTION_LIST: a CK_VERSION, then the PKCS#11 2.x functions in this order.
FUNCTION_NAMES = (
    "C_Initialize", "C_Finalize", "C_GetInfo", "C_GetFunctionList", "C_GetSlotList",
    "C_GetSlotInfo", "C_GetTokenInfo", "C_GetMechanismList", "C_GetMechanismInfo",
    "C_InitToken", "C_InitPIN", "C_SetPIN", "C_OpenSession", "C_CloseSession",
    "C_CloseAllSessions", "C_GetSessionInfo", "C_GetOperationState", "C_SetOperationState",
    "C_Login", "C_Logout", "C_CreateObject", "C_CopyObject", "C_DestroyObject",
    "C_GetObjectSize", "C_GetAttributeValue", "C_SetAttributeValue", "C_FindObjectsInit",
    "C_FindObjects", "C_FindObjectsFinal", "C_EncryptInit", "C_Encrypt", "C_EncryptUpdate",
    "C_EncryptFinal", "C_DecryptInit", "C_Decrypt", "C_DecryptUpdate", "C_DecryptFinal",
    "C_DigestInit", "C_Digest", "C_DigestUpdate", "C_DigestKey", "C_DigestFinal",
    "C_SignInit", "C_Sign", "C_SignUpdate", "C_SignFinal", "C_SignRecoverInit",
    "C_SignRecover", "C_VerifyInit", "C_Verify", "C_VerifyUpdate", "C_VerifyFinal",
    "C_VerifyRecoverInit", "C_VerifyRecover", "C_DigestEncryptUpdate",
    "C_DecryptDigestUpdate", "C_SignEncryptUpdate", "C_DecryptVerifyUpdate", "C_GenerateKey",
    "C_GenerateKeyPair", "C_WrapKey", "C_UnwrapKey", "C_DeriveKey", "C_SeedRandom",
    "C_GenerateRandom", "C_GetFunctionStatus", "C_CancelFunction", "C_WaitForSlotEvent",
)


class _Version(ctypes.Structure):
    _fields_ = (("major", ctypes.c_ubyte), ("minor", ctypes.c_ubyte))


class FunctionList(ctypes.Structure):
    _fields_ = (("version", _Version),
                *((name, ctypes.c_void_p) for name in FUNCTION_NAMES))


_CK_RV = ctypes.c_ulong
_SIGNATURES: dict[str, tuple[Any, ...]] = {
    "C_DeriveKey": (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                    ctypes.c_ulong, ctypes.c_void_p),
    "C_EncryptInit": (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong),
    "C_Encrypt": (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                  ctypes.c_void_p),
    "C_DestroyObject": (ctypes.c_ulong, ctypes.c_ulong),
    "C_GetSessionInfo": (ctypes.c_ulong, ctypes.c_void_p),
    "C_DecryptInit": (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong),
    "C_Decrypt": (ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong, ctypes.c_void_p,
                  ctypes.c_void_p),
}


class _SessionInfo(ctypes.Structure):
    _fields_ = (("slot", ctypes.c_ulong), ("state", ctypes.c_ulong), ("flags", ctypes.c_ulong),
                ("device_error", ctypes.c_ulong))


def _loaded_function_list(lib: pkcs11._pkcs11.lib | None) -> FunctionList | None:
    """The CK_FUNCTION_LIST python-pkcs11 itself calls through: `pkcs11.lib` is a Cython
    object whose first C field (right after the object header, no vtable in its base) is that
    pointer. Only trusted after `_holds_session` confirms it knows our session."""
    if lib is None:
        return None
    header = ctypes.sizeof(ctypes.c_ssize_t) + ctypes.sizeof(ctypes.c_void_p)
    address = ctypes.c_void_p.from_address(id(lib) + header).value
    return ctypes.cast(address, ctypes.POINTER(FunctionList)).contents if address else None


def _holds_session(functions: FunctionList | None, session_handle: int) -> bool:
    """Whether this function list's module instance knows the session (C_GetSessionInfo)."""
    if functions is None or not functions.C_GetSessionInfo:
        return False
    get_info = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_void_p)(
        functions.C_GetSessionInfo)
    info = _SessionInfo()
    return bool(get_info(session_handle, ctypes.byref(info)) == 0)


def function_list(module_path: str, lib: pkcs11._pkcs11.lib | None = None,
                  session_handle: int | None = None) -> FunctionList:
    """The CK_FUNCTION_LIST that holds `session_handle`: python-pkcs11's own (p11-kit's proxy
    and client hand out a separate instance per C_GetFunctionList call), else the module's
    through C_GetFunctionList, the one symbol every module exports (proxies export no other
    C_* functions).

    Raises:
        TokenError: the module cannot be loaded, has no C_GetFunctionList, or no function list
            found knows the session.
    """
    if session_handle is not None:
        try:
            own = _loaded_function_list(lib)
        except (ValueError, OSError):
            own = None
        if own is not None and _holds_session(own, session_handle):
            return own
    try:
        dll = ctypes.CDLL(module_path)  # the already loaded, initialised module
        get = dll.C_GetFunctionList
    except (OSError, AttributeError) as e:
        raise TokenError(f"module {module_path} does not export C_GetFunctionList") from e
    get.restype = _CK_RV
    get.argtypes = (ctypes.POINTER(ctypes.POINTER(FunctionList)),)
    ptr = ctypes.POINTER(FunctionList)()
    rv = get(ctypes.byref(ptr))
    if rv or not ptr:
        raise TokenError(f"module {module_path}: C_GetFunctionList failed (CKR {rv:#x})")
    functions = ptr.contents
    if session_handle is not None and not _holds_session(functions, session_handle):
        raise TokenError(f"module {module_path}: no function list holds this session; the "
                         "batch path cannot run here (derive devices one by one instead)")
    return functions


def c_function(functions: FunctionList, name: str) -> Any:
    """A callable for one entry of a CK_FUNCTION_LIST.

    Raises:
        TokenError: the module leaves the entry empty.
    """
    address = getattr(functions, name)
    if not address:
        raise TokenError(f"the module does not implement {name}")
    return ctypes.CFUNCTYPE(_CK_RV, *_SIGNATURES[name])(address)


def _session_handle(session: p11t.Session) -> int:
    """The session's CK_SESSION_HANDLE (a Cython attribute python-pkcs11's stub leaves out)."""
    return int(session.handle)  # type: ignore[attr-defined]


def _object_handle(obj: p11t.Object) -> int:
    """A token or session object's CK_OBJECT_HANDLE (the stub's None is for local domain
    parameters, which never come here)."""
    return int(cast(int, obj.handle))


class RawDeriver:
    """KCVs of derived per-device keys, straight through the PKCS#11 C API.

    Raises (constructor):
        TokenError: the module has no function list or lacks a function the batch path needs.
    """

    def __init__(self, module_path: str, session: p11t.Session, master: p11t.Key,
                 label: str = "?", lib: pkcs11._pkcs11.lib | None = None) -> None:
        self._label = label
        functions = function_list(module_path, lib, _session_handle(session))
        self._functions = functions
        self._derive = c_function(functions, "C_DeriveKey")
        self._encrypt_init = c_function(functions, "C_EncryptInit")
        self._encrypt = c_function(functions, "C_Encrypt")
        self._destroy = c_function(functions, "C_DestroyObject")
        self._session = ctypes.c_ulong(_session_handle(session))
        self._master = ctypes.c_ulong(_object_handle(master))
        self._keep: list[_CValue] = []
        self._templates: dict[int, ctypes.Array[_Attribute]] = {}
        self._ecb = _Mechanism(int(Mechanism.AES_ECB), None, 0)
        self._mech = int(Mechanism.AES_ECB_ENCRYPT_DATA)

    def _template(self, length: int) -> ctypes.Array[_Attribute]:
        if length not in self._templates:
            bools = {Attribute.TOKEN: False, Attribute.SENSITIVE: True,
                     Attribute.EXTRACTABLE: False, Attribute.ENCRYPT: True,
                     Attribute.DECRYPT: False, Attribute.DERIVE: False, Attribute.WRAP: False,
                     Attribute.UNWRAP: False, Attribute.SIGN: False, Attribute.VERIFY: False}
            ulongs = {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
                      Attribute.VALUE_LEN: length}
            items: list[tuple[int, _CValue]] = [
                (int(a), ctypes.c_ubyte(v)) for a, v in bools.items()]
            items += [(int(a), ctypes.c_ulong(int(v))) for a, v in ulongs.items()]
            tpl = (_Attribute * len(items))()
            for i, (attr, buf) in enumerate(items):
                self._keep.append(buf)
                tpl[i] = _Attribute(attr, ctypes.cast(ctypes.pointer(buf), ctypes.c_void_p),
                                    ctypes.sizeof(buf))
            self._templates[length] = tpl
        return self._templates[length]

    def kcv(self, device: bytes, purpose: str) -> str:
        """The KCV(s) of K_D for a device, '/'-joined for keys held as two objects.

        Raises:
            InputError: bad device id or purpose.
            TokenError: a PKCS#11 call failed (with its return code).
        """
        blocks = kdf.derivation_blocks(device, purpose)
        handle, out, out_len = ctypes.c_ulong(), (ctypes.c_ubyte * 16)(), ctypes.c_ulong()
        kcvs = []
        i = 0
        for n in kdf.split_for_purpose(purpose):
            data = b"".join(blocks[i:i + n])
            i += n
            param = _DerivationString(data, len(data))
            mech = _Mechanism(self._mech, ctypes.cast(ctypes.pointer(param), ctypes.c_void_p),
                              ctypes.sizeof(param))
            tpl = self._template(len(data))
            rv = self._derive(self._session, ctypes.byref(mech), self._master,
                              ctypes.cast(tpl, ctypes.c_void_p), len(tpl),
                              ctypes.byref(handle))
            if rv == _CKR_MECHANISM_INVALID:
                from hsmflash.token.profile import capability_refusal

                raise capability_refusal(self._label, "in_token_derivation",
                                         "batch per-device key derivation")
            if rv:
                raise TokenError(f"C_DeriveKey failed (CKR {rv:#x})")
            key = ctypes.c_ulong(handle.value)
            try:
                out_len.value = 16
                rv = self._encrypt_init(self._session, ctypes.byref(self._ecb), key)
                if not rv:
                    rv = self._encrypt(self._session, ctypes.byref(_ZERO16), 16,
                                       ctypes.byref(out), ctypes.byref(out_len))
                if rv:
                    raise TokenError(f"KCV C_Encrypt failed (CKR {rv:#x})")
                kcvs.append(bytes(out[:3]).hex())
            finally:
                self._destroy(self._session, key)
        return "/".join(kcvs)


def _attribute_template(bools: dict[Attribute, bool], ulongs: dict[Attribute, int],
                        keep: list[_CValue]) -> ctypes.Array[_Attribute]:
    items: list[tuple[int, _CValue]] = [(int(a), ctypes.c_ubyte(v)) for a, v in bools.items()]
    items += [(int(a), ctypes.c_ulong(int(v))) for a, v in ulongs.items()]
    tpl = (_Attribute * len(items))()
    for i, (attr, buf) in enumerate(items):
        keep.append(buf)
        tpl[i] = _Attribute(attr, ctypes.cast(ctypes.pointer(buf), ctypes.c_void_p),
                            ctypes.sizeof(buf))
    return tpl


class RawXorCipher:
    """ESP32-classic per-block keys through the C API: for each tweak, C_DeriveKey
    (CKM_XOR_BASE_AND_DATA, base XOR tweak) into a session object, one C_Encrypt/C_Decrypt
    (CKM_AES_ECB) over every block that uses it, C_DestroyObject at once. No Python object per
    key (python-pkcs11 builds a class per handle), and only one per-block key alive at a time.

    Raises (constructor):
        TokenError: no function list holds the session, or a function is missing.
    """

    def __init__(self, module_path: str, session: p11t.Session, base: p11t.Key,
                 lib: pkcs11._pkcs11.lib | None = None) -> None:
        functions = function_list(module_path, lib, _session_handle(session))
        self._derive = c_function(functions, "C_DeriveKey")
        self._init = {False: c_function(functions, "C_DecryptInit"),
                      True: c_function(functions, "C_EncryptInit")}
        self._run = {False: c_function(functions, "C_Decrypt"),
                     True: c_function(functions, "C_Encrypt")}
        self._destroy = c_function(functions, "C_DestroyObject")
        self._session = ctypes.c_ulong(_session_handle(session))
        self._base = ctypes.c_ulong(_object_handle(base))
        self._keep: list[_CValue] = []
        self._tpl = _attribute_template(
            {Attribute.TOKEN: False, Attribute.SENSITIVE: True, Attribute.EXTRACTABLE: False,
             Attribute.ENCRYPT: True, Attribute.DECRYPT: True},
            {Attribute.CLASS: ObjectClass.SECRET_KEY, Attribute.KEY_TYPE: KeyType.AES,
             Attribute.VALUE_LEN: 32}, self._keep)
        self._ecb = _Mechanism(int(Mechanism.AES_ECB), None, 0)
        self._tweak = ctypes.create_string_buffer(32)
        self._param = _DerivationString(ctypes.cast(self._tweak, ctypes.c_char_p), 32)
        self._mech = _Mechanism(int(Mechanism.XOR_BASE_AND_DATA),
                                ctypes.cast(ctypes.pointer(self._param), ctypes.c_void_p),
                                ctypes.sizeof(self._param))

    def crypt(self, tweak: bytes, blocks: bytes, *, encrypt: bool) -> bytes:
        """AES-ECB (encrypt or decrypt) of `blocks` with the key `base XOR tweak`.

        Raises:
            TokenError: a call failed (with its return code).
        """
        ctypes.memmove(self._tweak, tweak, 32)
        handle = ctypes.c_ulong()
        rv = self._derive(self._session, ctypes.byref(self._mech), self._base,
                          ctypes.cast(self._tpl, ctypes.c_void_p), len(self._tpl),
                          ctypes.byref(handle))
        if rv:
            raise TokenError(f"C_DeriveKey (CKM_XOR_BASE_AND_DATA) failed (CKR {rv:#x})")
        key = ctypes.c_ulong(handle.value)
        try:
            out = ctypes.create_string_buffer(len(blocks))
            out_len = ctypes.c_ulong(len(blocks))
            rv = self._init[encrypt](self._session, ctypes.byref(self._ecb), key)
            if not rv:
                rv = self._run[encrypt](self._session, blocks, len(blocks), out,
                                        ctypes.byref(out_len))
            if rv:
                raise TokenError(f"AES-ECB with a per-block key failed (CKR {rv:#x})")
            return out.raw[:out_len.value]
        finally:
            self._destroy(self._session, key)
            ctypes.memset(self._tweak, 0, 32)


def _worker(args: tuple[str, str | None, str, str, str, list[bytes]]) -> list[str]:
    """One worker process: its own module load, session and login."""
    module, conf, label, pin, master_name, macs = args
    if conf:
        os.environ["SOFTHSM2_CONF"] = conf
    from hsmflash.token.keys import find_key
    from hsmflash.token.session import TokenConfig, open_session

    purpose = os.environ.get("HSMFLASH_RAW_PURPOSE", "XTS_AES_128_KEY")
    cfg = TokenConfig(module=module, token_label=label, pin_handler=lambda _p: pin)
    with open_session(cfg) as session:
        master = find_key(session, master_name, label)
        raw = RawDeriver(cfg.module_path, session, master.primary, label, cfg.lib())
        return [raw.kcv(mac, purpose) for mac in macs]


def kcvs_in_workers(module: str, label: str, pin: str, master_name: str, purpose: str,
                    macs: Sequence[bytes], workers: int) -> list[str]:
    """Split a lot across `workers` processes (spawned: PKCS#11 state never crosses a fork).

    Raises:
        TokenError: from any worker.
    """
    import multiprocessing

    chunks = [list(macs[i::workers]) for i in range(workers)]
    os.environ["HSMFLASH_RAW_PURPOSE"] = purpose
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(workers) as pool:
        parts = pool.map(_worker, [(module, os.environ.get("SOFTHSM2_CONF"), label, pin,
                                    master_name, chunk) for chunk in chunks])
    out: list[str] = [""] * len(macs)
    for w, part in enumerate(parts):
        out[w::workers] = part
    return out
