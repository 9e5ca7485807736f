"""One root error, narrow subclasses by who is at fault.

Every error carries its exit code (README: exit codes). Messages are one line and name the input at
fault; they never contain key material. The CLI is the only place that turns them into exits.
"""

from __future__ import annotations

# the prefix of the note a failed end-of-command audit checkpoint adds to the command's error
CHECKPOINT_FAILED = "audit checkpoint failed: "

class Error(Exception):
    """Root of every error hsmflash raises on purpose."""

    exit_code = 1

    def diagnostics(self) -> str:
        """One line for the user: what is wrong and, where known, what to do."""
        return str(self) or self.__class__.__name__


class InternalError(Error):
    """A bug in hsmflash or an unexpected state; exit 1."""

    exit_code = 1


class UsageError(Error):
    """The command line itself is wrong (missing or contradictory options); exit 2."""

    exit_code = 2


class InputError(Error):
    """Bad input: a file, image, address, MAC, CSV or policy syntax; exit 3."""

    exit_code = 3


class TokenError(Error):
    """The PKCS#11 module, token, PIN, a missing key or a missing mechanism; exit 4."""

    exit_code = 4


class PolicyRefused(Error):
    """The policy forbids what was asked; exit 5."""

    exit_code = 5


class VerificationFailed(Error):
    """A signature, digest, audit chain or revocation list does not verify; exit 6."""

    exit_code = 6


class DeviceError(Error):
    """The port, the chip or its eFuses are not as required; exit 7."""

    exit_code = 7
