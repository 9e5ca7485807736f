#!/usr/bin/env bash
# Installs what hsmflash needs on Debian/Ubuntu: SoftHSM2 from apt, a venv with the package.
# Idempotent; sourced by quickstart.sh and test.sh.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$top"

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

need_apt=()
command -v softhsm2-util >/dev/null 2>&1 || need_apt+=(softhsm2)
# tests: a real MQTT broker for device certificates (started and stopped by the test itself;
# the Debian package also enables a system service, which the tests do not use)
[ -x /usr/sbin/mosquitto ] || command -v mosquitto >/dev/null 2>&1 || need_apt+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need_apt+=(openssl)
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need_apt+=(python3-venv)
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' 2>/dev/null || {
  echo "hsmflash needs Python >= 3.11 (found: $(python3 --version 2>&1))" >&2; exit 1; }
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "== apt-get install ${need_apt[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  python3 -m venv .venv
fi
if ! .venv/bin/python -c 'import hsmflash, pytest, ruff, mypy' >/dev/null 2>&1 \
   || [ pyproject.toml -nt .venv/.hsmflash-installed ]; then
  echo "== pip install -e .[dev]"
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch .venv/.hsmflash-installed
fi
# Byte-compile the checkout (pip does this for regular installs, not for -e): with
# PYTHONDONTWRITEBYTECODE set, every command would otherwise recompile hsmflash (~45 ms).
.venv/bin/python -m compileall -q hsmflash >/dev/null
