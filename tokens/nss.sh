#!/usr/bin/env bash
# NSS softokn (libsoftokn3) as a PKCS#11 token, through p11-kit's proxy.
#   tokens/nss.sh start DIR   -> makes an NSS database in DIR, registers it with p11-kit
#   tokens/nss.sh stop DIR    -> unregisters it (the database stays in DIR)
# softokn needs C_Initialize "reserved" arguments (configdir=...), which python-pkcs11 cannot
# pass; p11-kit's proxy passes them from a module file's `x-init-reserved`. For root, p11-kit
# reads module files only from /etc/pkcs11/modules/, so one file per DIR lives there.
# No daemon. The token label is set per DIR (dbTokenDescription), so several can coexist.
source "$(dirname "$0")/lib.sh"
cmd=${1:-}; dir=$(state_dir "${2:-}")
ma=$(multiarch)
softokn=/usr/lib/$ma/libsoftokn3.so
proxy=/usr/lib/$ma/p11-kit-proxy.so
id=$(printf '%s' "$dir" | sha256sum | cut -c1-8)
modfile=/etc/pkcs11/modules/hsmflash-nss-$id.module
label="hsmflash-nss-$id"

case $cmd in
start)
  need_pkgs "$softokn:libnss3" certutil:libnss3-tools p11-kit:p11-kit "$proxy:p11-kit-modules"
  new_pin "$dir/user.pin" 16
  if [ ! -f "$dir/db/key4.db" ]; then
    mkdir -p "$dir/db"
    certutil -N -d "sql:$dir/db" -f "$dir/user.pin" >/dev/null
  fi
  as_root mkdir -p /etc/pkcs11/modules
  # p11-kit loads libsoftokn3 once per process: one NSS database can be registered at a time,
  # machine-wide. A registration whose database is gone is stale and removed; a live one (a
  # concurrent run) is waited for (HSMFLASH_TOKEN_WAIT seconds, default 900).
  machine_lock nss
  for other in /etc/pkcs11/modules/hsmflash-nss-*.module; do
    [ -e "$other" ] && [ "$other" != "$modfile" ] || continue
    odb=$(sed -n "s/^x-init-reserved: configdir='sql:\\([^']*\\)'.*/\\1/p" "$other")
    live() { [ -e "$other" ] && [ -n "$odb" ] && [ -f "$odb/key4.db" ]; }
    wait_while "${HSMFLASH_TOKEN_WAIT:-900}" "NSS registration $other ($odb)" live
    as_root rm -f "$other"
  done
  tmp=$(mktemp)
  cat >"$tmp" <<MOD
# hsmflash tokens/nss.sh for $dir (removed by: tokens/nss.sh stop $dir)
module: $softokn
critical: no
x-init-reserved: configdir='sql:$dir/db' certPrefix='' keyPrefix='' secmod='secmod.db' flags= dbTokenDescription='$label'
MOD
  as_root install -m 644 "$tmp" "$modfile"; rm -f "$tmp"
  write_env "$dir" "HSMFLASH_MODULE=$proxy" "HSMFLASH_TOKEN=$label" \
    "HSMFLASH_PIN_FILE=$dir/user.pin"
  ;;
stop)
  as_root rm -f "$modfile"
  ;;
*) die "usage: nss.sh start|stop DIR" ;;
esac
