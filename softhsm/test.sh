#!/usr/bin/env bash
# The whole test suite: installs what it needs, then ruff, mypy --strict and pytest.
# Tests make their own SoftHSM token per session; nothing here touches softhsm/tokens.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/softhsm/install.sh"
# the token matrix brings up NSS, openCryptoki, tpm2-pkcs11 and p11-kit remoting from these
# Debian packages (its fixtures start and stop the daemons)
bash "$top/tokens/install.sh"
cd "$top"
echo "== ruff"
.venv/bin/ruff check .
echo "== mypy --strict hsmflash/"
.venv/bin/mypy
echo "== pytest"
.venv/bin/pytest -q -p no:cacheprovider "$@"
