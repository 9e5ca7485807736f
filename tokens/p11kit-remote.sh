#!/usr/bin/env bash
# p11-kit remoting: `p11-kit server` exports one token of a module on a Unix socket; clients
# load p11-kit-client.so with P11_KIT_SERVER_ADDRESS (the way several stations share one HSM).
#   tokens/p11kit-remote.sh start DIR [MODULE TOKEN_LABEL [PIN_FILE]]
#        MODULE defaults to SoftHSM2; without a label a SoftHSM2 token is made in DIR
#   tokens/p11kit-remote.sh stop DIR
# Proxies export only C_GetFunctionList (no C_* symbols); the client's mechanism list is
# filtered (no CKM_AES_ECB_ENCRYPT_DATA).
source "$(dirname "$0")/lib.sh"
cmd=${1:-}; dir=$(state_dir "${2:-}")
ma=$(multiarch)
client=/usr/lib/$ma/pkcs11/p11-kit-client.so

case $cmd in
start)
  need_pkgs p11-kit:p11-kit "$client:p11-kit-modules" softhsm2-util:softhsm2
  provider=${3:-}; label=${4:-}; pinfile=${5:-}
  extra=()
  if [ -z "$label" ]; then
    provider=/usr/lib/softhsm/libsofthsm2.so
    label=hsmflash-remote
    pinfile=$dir/user.pin
    new_pin "$dir/so.pin" 16; new_pin "$dir/user.pin" 16
    mkdir -p "$dir/softhsm"
    printf 'directories.tokendir = %s\nobjectstore.backend = file\nlog.level = ERROR\n' \
      "$dir/softhsm" >"$dir/softhsm2.conf"
    export SOFTHSM2_CONF=$dir/softhsm2.conf
    if ! softhsm2-util --show-slots 2>/dev/null | grep -q "Label: *$label\$"; then
      # softhsm2-util reads PINs only from argv: random, per DIR, short-lived process
      softhsm2-util --init-token --free --label "$label" \
        --so-pin "$(cat "$dir/so.pin")" --pin "$(cat "$dir/user.pin")" >/dev/null
    fi
    extra=("SOFTHSM2_CONF=$dir/softhsm2.conf")
  fi
  [ -n "$provider" ] || die "give MODULE and TOKEN_LABEL, or neither"
  if ! alive "$dir/server.pid"; then
    rm -f "$dir/p11kit.sock"
    setsid p11-kit server -f -n "$dir/p11kit.sock" --provider "$provider" \
      "pkcs11:token=$label" >"$dir/server.log" 2>&1 </dev/null &
    echo $! >"$dir/server.pid"
    for _ in $(seq 50); do [ -S "$dir/p11kit.sock" ] && break; sleep 0.1; done
    [ -S "$dir/p11kit.sock" ] || die "p11-kit server did not start (see $dir/server.log)"
  fi
  write_env "$dir" "HSMFLASH_MODULE=$client" "HSMFLASH_TOKEN=$label" \
    "HSMFLASH_PIN_FILE=$pinfile" "P11_KIT_SERVER_ADDRESS=unix:path=$dir/p11kit.sock" \
    "${extra[@]}"
  ;;
stop)
  stop_pid "$dir/server.pid"; rm -f "$dir/p11kit.sock"
  ;;
*) die "usage: p11kit-remote.sh start|stop DIR [MODULE TOKEN_LABEL [PIN_FILE]]" ;;
esac
