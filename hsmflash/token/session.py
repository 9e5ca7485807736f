"""The PKCS#11 token: module loading, token selection, PINs, the one session helper.

Keys are referenced by label or by RFC 7512 URI (`pkcs11:token=release;object=sb-signing`).
PINs come through a `PinHandler` the caller supplies (the CLI reads `HSMFLASH_PIN`, a PIN file
or a prompt); this module never prompts and never retries a wrong PIN.
"""

from __future__ import annotations

import os
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pkcs11
import pkcs11.exceptions as p11x
from pkcs11 import Mechanism

from hsmflash.errors import Error, InputError, TokenError

if TYPE_CHECKING:
    import pkcs11._pkcs11
    import pkcs11.types as p11t

PinHandler = Callable[[str], str]
"""Called with a prompt naming the token; returns the user PIN."""

# Where distributions put SoftHSM2's PKCS#11 library (the embedded default).
SOFTHSM_CANDIDATES = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib/aarch64-linux-gnu/softhsm/libsofthsm2.so",
    "/usr/lib64/pkcs11/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/opt/homebrew/lib/softhsm/libsofthsm2.so",
)
DEFAULT_TOKEN_LABEL = "hsmflash-dev"  # noqa: S105 - a label, not a secret

# Mechanisms hsmflash uses, with what each one enables (shown by `token info`).
MECHANISMS_THAT_MATTER: dict[str, str] = {
    "AES_KEY_GEN": "generate AES master and flash-encryption keys in the token",
    "AES_ECB": "XTS-AES flash encryption and SBv1 bootloader digests with in-token keys",
    "AES_ECB_ENCRYPT_DATA": "per-device key derivation (aes-ecb-v1) inside the token",
    "XOR_BASE_AND_DATA": "ESP32-classic tweaked keys without exporting the device key",
    "RSA_PKCS_KEY_PAIR_GEN": "generate RSA-3072 Secure Boot V2 keys",
    "RSA_PKCS_PSS": "Secure Boot V2 RSA-PSS signatures (raw, host-hashed)",
    "EC_KEY_PAIR_GEN": "generate ECDSA keys (SBv1, SBv2 ECDSA, audit)",
    "ECDSA": "ECDSA signatures (raw, host-hashed): SBv1, SBv2 ECDSA, audit checkpoints",
}


def find_module(explicit: str | None) -> str:
    """Return the PKCS#11 module path to load.

    Raises:
        TokenError: the given module does not exist, or no SoftHSM2 library was found.
    """
    if explicit:
        if not Path(explicit).is_file():
            raise TokenError(f"PKCS#11 module {explicit!r} not found (--module/HSMFLASH_MODULE)")
        return explicit
    for candidate in SOFTHSM_CANDIDATES:
        if Path(candidate).is_file():
            return candidate
    raise TokenError(
        "no PKCS#11 module given and SoftHSM2 not found; install it (apt-get install softhsm2) "
        "or pass --module /path/to/pkcs11.so"
    )


def checkout_softhsm_conf() -> Path | None:
    """The embedded default token's config under the checkout, if it has been set up."""
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        conf = base / "softhsm" / "softhsm2.conf"
        if conf.is_file():
            return conf
    return None


@dataclass(frozen=True)
class KeyRef:
    """A key reference: a label, optionally pinned to a token, as an RFC 7512 URI."""

    label: str
    token: str | None = None

    @classmethod
    def parse(cls, ref: str) -> KeyRef:
        """Parse a plain label or a `pkcs11:` URI (attributes `token`, `object`).

        Raises:
            InputError: the URI is malformed or has no `object`.
        """
        if not ref.startswith("pkcs11:"):
            if not ref or any(c in ref for c in ";/?") or len(ref) > 64:
                raise InputError(
                    f"key name {ref!r} is not a valid label (1-64 chars, no ';', '/', '?')"
                )
            return cls(ref)
        path = ref[len("pkcs11:"):].split("?", 1)[0]
        attrs: dict[str, str] = {}
        for part in filter(None, path.split(";")):
            name, sep, value = part.partition("=")
            if not sep:
                raise InputError(f"key URI {ref!r}: attribute {name!r} has no value")
            attrs[name] = urllib.parse.unquote(value)
        if "object" not in attrs:
            raise InputError(f"key URI {ref!r} names no object (pkcs11:token=...;object=NAME)")
        return cls(attrs["object"], attrs.get("token"))

    def uri(self, token_label: str) -> str:
        q = urllib.parse.quote
        return f"pkcs11:token={q(self.token or token_label)};object={q(self.label)}"


# SoftHSM rewrites a token's file on every login; a process reading it just then (C_Initialize,
# C_GetTokenInfo, C_Login) sees no token or gets CKR_GENERAL_ERROR. Station workers log in
# together, so lookups and logins are retried (1.4 s at most: a loaded 2-core machine needs
# more than 0.6 s), CKR_GENERAL_ERROR only on
# SoftHSM: on an HSM it means a real failure.
_RETRY_ATTEMPTS = 12
# sessions this process holds open: the module is re-initialised only when there are none
_open_sessions = 0


def _is_softhsm(module_path: str) -> bool:
    return "softhsm" in Path(module_path).name.lower()


def _backoff(attempt: int) -> None:
    time.sleep(min(0.01 * 2**attempt, 0.16))


@dataclass
class TokenConfig:
    """Which module and token to use, and how to get the PIN."""

    module: str | None = None
    token_label: str | None = None
    pin_handler: PinHandler | None = None
    _lib: pkcs11._pkcs11.lib | None = field(default=None, repr=False)
    _token: p11t.Token | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return self.token_label or DEFAULT_TOKEN_LABEL

    def lib(self) -> pkcs11._pkcs11.lib:
        """Load the module once per process.

        Raises:
            TokenError: the module cannot be found or loaded.
        """
        if self._lib is None:
            path = find_module(self.module)
            if _is_softhsm(path) and "SOFTHSM2_CONF" not in os.environ:
                conf = checkout_softhsm_conf()
                if conf is not None:
                    os.environ["SOFTHSM2_CONF"] = str(conf)
            try:
                self._lib = pkcs11.lib(path)
            except (OSError, RuntimeError, p11x.PKCS11Error) as e:
                raise TokenError(f"cannot load PKCS#11 module {path!r}: {e}") from e
            self._module_path = path
        return self._lib

    @property
    def module_path(self) -> str:
        self.lib()
        return str(self._module_path)

    @property
    def is_softhsm(self) -> bool:
        return _is_softhsm(self.module_path)

    def token(self) -> p11t.Token:
        """Find the token by label (once; later calls return the same token).

        Raises:
            TokenError: no token, or several tokens, carry the label.
        """
        if self._token is not None:
            return self._token
        lib = self.lib()
        retried = (p11x.NoSuchToken, p11x.GeneralError) if self.is_softhsm else (p11x.NoSuchToken,)
        for attempt in range(_RETRY_ATTEMPTS):
            try:
                self._token = lib.get_token(token_label=self.label)
                return self._token
            except retried as e:
                if attempt == _RETRY_ATTEMPTS - 1:
                    if isinstance(e, p11x.GeneralError):
                        raise wrap_pkcs11(e, f"token {self.label!r}") from e
                    break
                _backoff(attempt)
                if _open_sessions == 0:  # never pull the module from under an open session
                    try:
                        lib.reinitialize()
                    except p11x.PKCS11Error:
                        pass
            except p11x.MultipleTokensReturned:
                raise TokenError(f"several tokens are labelled {self.label!r}") from None
            except p11x.PKCS11Error as e:
                raise wrap_pkcs11(e, f"token {self.label!r}") from e
        labels = []
        try:
            labels = [t.label for t in lib.get_tokens()]
        except p11x.PKCS11Error:
            pass
        hint = f" (tokens present: {', '.join(labels)})" if labels else " (no tokens present)"
        raise TokenError(f"no token labelled {self.label!r}{hint}")


_PKCS11_MESSAGES: dict[type[BaseException], str] = {
    p11x.PinIncorrect: "wrong PIN (not retried: tokens lock after repeated failures)",
    p11x.PinLocked: "the PIN is locked; reset it with the security officer PIN",
    p11x.PinLenRange: "the PIN has the wrong length for this token",
    p11x.MechanismInvalid: "the token does not support this mechanism",
    p11x.KeyUnextractable: "the key is not extractable",
    p11x.KeyTypeInconsistent: "the key type does not fit this mechanism",
    p11x.TokenNotPresent: "the token is not present",
    p11x.DeviceRemoved: "the token was removed",
    p11x.UserNotLoggedIn: "not logged in",
}


def wrap_pkcs11(e: BaseException, what: str) -> TokenError:
    """Turn a python-pkcs11 exception into a one-line TokenError naming `what`."""
    for cls, text in _PKCS11_MESSAGES.items():
        if isinstance(e, cls):
            return TokenError(f"{what}: {text} ({type(e).__name__})")
    detail = str(e).splitlines()[0] if str(e) else ""
    return TokenError(f"{what}: PKCS#11 error {type(e).__name__}{': ' + detail if detail else ''}")


def _log_in(token: p11t.Token, rw: bool, pin: str | None, *,
            retry_general_error: bool) -> p11t.Session:
    """Open a session and log in; a wrong PIN is never retried."""
    for attempt in range(_RETRY_ATTEMPTS):
        try:
            return token.open(rw=rw, user_pin=pin)
        except p11x.UserAlreadyLoggedIn:
            # this process already holds a logged-in session (PKCS#11 login is per application)
            return token.open(rw=rw)
        except (p11x.GeneralError, p11x.UserPinNotInitialized):
            # SoftHSM read its token file while another login rewrote it (seen in the full
            # suite's contention test); never a wrong PIN, so retrying cannot lock the token
            if not retry_general_error or attempt == _RETRY_ATTEMPTS - 1:
                raise
            _backoff(attempt)
    raise AssertionError("unreachable")


@contextmanager
def open_session(config: TokenConfig, *, rw: bool = False,
                 login: bool = True) -> Iterator[p11t.Session]:
    """The one way hsmflash opens a session: find the token, ask the PIN once, log in.

    Raises:
        TokenError: module, token or PIN problems, and any PKCS#11 error inside the block.
    """
    token = config.token()
    pin: str | None = None
    if login:
        if config.pin_handler is None:
            raise TokenError(
                f"token {config.label!r} needs a PIN: set HSMFLASH_PIN, pass --pin-file, "
                "or run interactively"
            )
        pin = config.pin_handler(f"User PIN for token {config.label!r}: ")
    global _open_sessions
    try:
        session = _log_in(token, rw, pin, retry_general_error=config.is_softhsm)
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"token {config.label!r}") from e
    _open_sessions += 1
    try:
        yield session
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"token {config.label!r}") from e
    finally:
        _open_sessions -= 1
        try:
            session.close()
        except p11x.PKCS11Error:
            pass


def mechanism_names(config: TokenConfig) -> set[str]:
    """Names of the mechanisms the token's slot reports.

    Raises:
        TokenError: the token cannot be reached.
    """
    try:
        mechs = config.token().slot.get_mechanisms()
    except p11x.PKCS11Error as e:
        raise wrap_pkcs11(e, f"token {config.label!r}") from e
    names = set()
    for m in mechs:
        name = getattr(m, "name", None)
        if name:
            names.add(name)
    return names


def supports(config: TokenConfig, mechanism: str) -> bool:
    """Whether the token's slot lists `mechanism` (a `pkcs11.Mechanism` name)."""
    return hasattr(Mechanism, mechanism) and mechanism in mechanism_names(config)


def require_mechanism(config: TokenConfig, mechanism: str, purpose: str) -> None:
    """Raise TokenError naming the missing mechanism and what needs it."""
    if not supports(config, mechanism):
        raise TokenError(
            f"token {config.label!r} lacks CKM_{mechanism}, needed for {purpose}"
        )


def token_summary(config: TokenConfig) -> dict[str, Any]:
    """What `token info` shows: module, token, mechanisms that matter, supported paths.

    Raises:
        TokenError: the module or token cannot be reached.
    """
    token = config.token()
    names = mechanism_names(config)
    lib = config.lib()
    mechanisms = {m: (m in names) for m in MECHANISMS_THAT_MATTER}
    paths = {
        "in_token_derivation": mechanisms["AES_ECB_ENCRYPT_DATA"],
        "in_token_xts": mechanisms["AES_ECB"],
        "esp32_classic": (
            "in-token (CKM_XOR_BASE_AND_DATA)"
            if mechanisms["XOR_BASE_AND_DATA"]
            else "transient export of the per-device key "
            "(needs policy export.esp32_classic_transient)"
        ),
        "sbv2_rsa": mechanisms["RSA_PKCS_PSS"],
        "ecdsa": mechanisms["ECDSA"],
    }
    return {
        "module": config.module_path,
        "library": f"{lib.manufacturer_id} {lib.library_description}".strip(),
        "token": {
            "label": token.label,
            "manufacturer": token.manufacturer_id,
            "model": token.model,
            "serial": token.serial.decode(errors="replace")
            if isinstance(token.serial, bytes)
            else str(token.serial),
        },
        "mechanisms": mechanisms,
        "paths": paths,
    }


__all__ = [
    "DEFAULT_TOKEN_LABEL",
    "Error",
    "KeyRef",
    "PinHandler",
    "TokenConfig",
    "find_module",
    "open_session",
    "require_mechanism",
    "supports",
    "token_summary",
    "wrap_pkcs11",
]
