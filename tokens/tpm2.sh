#!/usr/bin/env bash
# tpm2-pkcs11 on a software TPM: swtpm + a private D-Bus + tpm2-abrmd, store in DIR.
#   tokens/tpm2.sh start DIR  -> starts the three daemons (once), makes the token (once)
#   tokens/tpm2.sh stop DIR   -> stops the daemons this script started
# The resource manager (tpm2-abrmd) is needed: without it the TPM runs out of object slots.
# The printed environment (DBUS_SESSION_BUS_ADDRESS, TPM2_PKCS11_TCTI, TPM2_PKCS11_STORE) must
# be set in the process that loads the module.
source "$(dirname "$0")/lib.sh"
cmd=${1:-}; dir=$(state_dir "${2:-}")
ma=$(multiarch)
module=/usr/lib/$ma/pkcs11/libtpm2_pkcs11.so
label=hsmflash-tpm2

case $cmd in
start)
  need_pkgs swtpm:swtpm swtpm_setup:swtpm-tools tpm2_startup:tpm2-tools tpm2-abrmd:tpm2-abrmd \
    "/usr/lib/$ma/libtss2-tcti-tabrmd.so.0:libtss2-tcti-tabrmd0" \
    "/usr/lib/$ma/libtss2-tcti-swtpm.so.0:libtss2-tcti-swtpm0" \
    "$module:libtpm2-pkcs11-1" tpm2_ptool:libtpm2-pkcs11-tools dbus-daemon:dbus
  new_pin "$dir/so.pin" 16; new_pin "$dir/user.pin" 16
  mkdir -p "$dir/swtpm" "$dir/store"
  if ! alive "$dir/swtpm.pid"; then
    port=$(free_port); echo "$port" >"$dir/swtpm.port"
    swtpm socket --tpm2 --tpmstate "dir=$dir/swtpm" \
      --server "type=tcp,port=$port,bindaddr=127.0.0.1" \
      --ctrl "type=tcp,port=$((port + 1)),bindaddr=127.0.0.1" \
      --flags not-need-init,startup-clear --pid "file=$dir/swtpm.pid" --daemon \
      --log "file=$dir/swtpm.log"
    for _ in $(seq 50); do [ -s "$dir/swtpm.pid" ] && break; sleep 0.1; done
  fi
  port=$(cat "$dir/swtpm.port")
  if ! alive "$dir/dbus.pid"; then
    dbus-daemon --session --fork --address="unix:path=$dir/dbus.sock" \
      --print-pid=3 3>"$dir/dbus.pid" >/dev/null
  fi
  bus="unix:path=$dir/dbus.sock"
  if ! alive "$dir/abrmd.pid"; then
    DBUS_SESSION_BUS_ADDRESS=$bus setsid tpm2-abrmd --session --allow-root \
      --tcti="swtpm:host=127.0.0.1,port=$port" >"$dir/abrmd.log" 2>&1 </dev/null &
    echo $! >"$dir/abrmd.pid"
    for _ in $(seq 100); do
      DBUS_SESSION_BUS_ADDRESS=$bus TPM2TOOLS_TCTI=tabrmd:bus_type=session \
        tpm2_getrandom 4 >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi
  export DBUS_SESSION_BUS_ADDRESS=$bus TPM2_PKCS11_TCTI=tabrmd:bus_type=session \
    TPM2TOOLS_TCTI=tabrmd:bus_type=session TPM2_PKCS11_STORE=$dir/store
  if [ ! -f "$dir/initialised" ]; then
    tpm2_ptool init --path "$dir/store" >/dev/null
    # tpm2_ptool takes PINs only as arguments; they are random, per DIR, and the process is
    # short-lived (no other way with this tool)
    tpm2_ptool addtoken --path "$dir/store" --pid=1 --label "$label" \
      --sopin "$(cat "$dir/so.pin")" --userpin "$(cat "$dir/user.pin")" >/dev/null
    touch "$dir/initialised"
  fi
  write_env "$dir" "HSMFLASH_MODULE=$module" "HSMFLASH_TOKEN=$label" \
    "HSMFLASH_PIN_FILE=$dir/user.pin" "DBUS_SESSION_BUS_ADDRESS=$bus" \
    "TPM2_PKCS11_TCTI=tabrmd:bus_type=session" "TPM2_PKCS11_STORE=$dir/store"
  ;;
stop)
  stop_pid "$dir/abrmd.pid"; stop_pid "$dir/dbus.pid"; stop_pid "$dir/swtpm.pid"
  ;;
*) die "usage: tpm2.sh start|stop DIR" ;;
esac
