#!/usr/bin/env bash
# The main job on the embedded default: a SoftHSM token under the checkout and virtual chips.
# Creates the dev token and the keys of policies/dev.toml, provisions a virtual ESP32-S3 and
# a virtual ESP32 (FiPy) end to end, and verifies the audit log.
set -euo pipefail
top=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$top/softhsm/install.sh"
cd "$top"

.venv/bin/python -m hsmflash.devtools.devtoken softhsm
export SOFTHSM2_CONF="$top/softhsm/softhsm2.conf"
export HSMFLASH_PIN_FILE="$top/softhsm/user.pin"
export HSMFLASH_POLICY="$top/policies/dev.toml"
export HSMFLASH_AUDIT_LOG="$top/work/audit.jsonl"
mkdir -p work
hs=.venv/bin/hsmflash

echo "== token"
$hs token info
echo "== keys (policies/dev.toml)"
$hs keys create
$hs keys list
$hs keys public audit -o work/audit.pem >/dev/null

if $hs provision --help >/dev/null 2>&1; then
  echo "== provisioning virtual chips"
  .venv/bin/python -m hsmflash.devtools.demo work
fi

echo "== audit log"
$hs audit verify "$HSMFLASH_AUDIT_LOG" --pubkey work/audit.pem
$hs audit verify "$HSMFLASH_AUDIT_LOG" --with-token
echo "quickstart done: token in softhsm/tokens, outputs in work/, log in $HSMFLASH_AUDIT_LOG"
