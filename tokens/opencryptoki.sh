#!/usr/bin/env bash
# openCryptoki's soft token (libpkcs11_sw) as a PKCS#11 token.
#   tokens/opencryptoki.sh start DIR  -> config + pkcsslotd + an initialised token, state in DIR
#   tokens/opencryptoki.sh stop DIR   -> stops the pkcsslotd this script started
# openCryptoki 3.8 reads one global config (/etc/opencryptoki/opencryptoki.conf) and keeps a
# token's objects under /var/lib/opencryptoki/<tokname>; that path is a symlink into DIR, so
# removing DIR (after stop) removes the token. PINs are 8 random characters (the token's max),
# fed to pkcsconf on stdin. Re-initialising a 3.8 token breaks SO login: a fresh token is made
# by removing DIR, never by `pkcsconf -I` twice.
source "$(dirname "$0")/lib.sh"
cmd=${1:-}; dir=$(state_dir "${2:-}")
ma=$(multiarch)
module=/usr/lib/$ma/pkcs11/libopencryptoki.so
tokname=hsmflash-ock
label=hsmflash-ock
conf=/etc/opencryptoki/opencryptoki.conf
store=/var/lib/opencryptoki/$tokname
slot=3

pkcsslotd_pid() { pgrep -x pkcsslotd | head -1 || true; }

case $cmd in
start)
  need_pkgs pkcsslotd:opencryptoki "$module:opencryptoki"
  new_pin "$dir/so.pin" 8; new_pin "$dir/user.pin" 8
  # one global configuration and token path: a concurrent run's token is waited for
  # (HSMFLASH_TOKEN_WAIT seconds, default 900)
  machine_lock opencryptoki
  held() {
    local t; t=$(readlink "$store" 2>/dev/null) || return 1
    [ "$t" != "$dir/tok" ] && [ -d "$t" ]
  }
  wait_while "${HSMFLASH_TOKEN_WAIT:-900}" "openCryptoki token $store" held
  mkdir -p "$dir/tok/TOK_OBJ"
  chgrp -R pkcs11 "$dir" 2>/dev/null || true; chmod 770 "$dir" "$dir/tok" "$dir/tok/TOK_OBJ"
  if [ "$(readlink "$store" 2>/dev/null)" != "$dir/tok" ]; then
    rm -rf "$store"; ln -s "$dir/tok" "$store"
  fi
  want="version opencryptoki-3.1
# written by hsmflash tokens/opencryptoki.sh
slot $slot
{
stdll = libpkcs11_sw.so
tokname = $tokname
}"
  if [ "$(cat "$conf" 2>/dev/null)" != "$want" ]; then
    [ -f "$conf.hsmflash-orig" ] || cp "$conf" "$conf.hsmflash-orig" 2>/dev/null || true
    printf '%s\n' "$want" >"$conf"
    old=$(pkcsslotd_pid); [ -n "$old" ] && [ -s "$dir/pkcsslotd.pid" ] && stop_pid "$dir/pkcsslotd.pid"
  fi
  if [ -z "$(pkcsslotd_pid)" ]; then
    mkdir -p /run/opencryptoki; chgrp pkcs11 /run/opencryptoki 2>/dev/null || true
    pkcsslotd
    for _ in $(seq 50); do [ -n "$(pkcsslotd_pid)" ] && break; sleep 0.1; done
    pkcsslotd_pid >"$dir/pkcsslotd.pid"
  fi
  if [ ! -f "$dir/initialised" ]; then
    so=$(cat "$dir/so.pin"); user=$(cat "$dir/user.pin")
    # factory SO PIN 87654321; label; then set SO PIN, user PIN, and change the user PIN once
    # (clears "user PIN to be changed"): each prompt answered on stdin
    printf '%s\n%s\n' 87654321 "$label" | pkcsconf -c $slot -I >/dev/null
    printf '%s\n%s\n%s\n' 87654321 "$so" "$so" | pkcsconf -c $slot -P >/dev/null
    tmpu=$(python3 -c 'import secrets; print(secrets.token_hex(4))')
    printf '%s\n%s\n%s\n' "$so" "$tmpu" "$tmpu" | pkcsconf -c $slot -u >/dev/null
    printf '%s\n%s\n%s\n' "$tmpu" "$user" "$user" | pkcsconf -c $slot -p >/dev/null
    touch "$dir/initialised"
  fi
  write_env "$dir" "HSMFLASH_MODULE=$module" "HSMFLASH_TOKEN=$label" \
    "HSMFLASH_PIN_FILE=$dir/user.pin"
  ;;
stop)
  # only a pkcsslotd this script started
  if [ -s "$dir/pkcsslotd.pid" ] && [ "$(pkcsslotd_pid)" = "$(cat "$dir/pkcsslotd.pid")" ]; then
    stop_pid "$dir/pkcsslotd.pid"
  fi
  rm -f "$dir/pkcsslotd.pid"
  [ "$(readlink "$store" 2>/dev/null)" = "$dir/tok" ] && rm -f "$store"
  true
  ;;
*) die "usage: opencryptoki.sh start|stop DIR" ;;
esac
