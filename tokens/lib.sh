# Shared helpers for the token bring-up scripts (sourced, not run).
# Each script: `tokens/X.sh start DIR` (idempotent) prints KEY=VALUE lines (also in DIR/env)
# that point hsmflash at the token; `tokens/X.sh stop DIR` stops what start started.
# PINs are random, written to 0600 files in DIR, and reach tools on stdin or via files.
set -euo pipefail

die() { echo "$(basename "$0"): $*" >&2; exit 1; }

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# need_pkgs CMD_OR_FILE:PACKAGE ... -- installs the packages whose probe is missing
need_pkgs() {
  local missing=() spec probe pkg
  for spec in "$@"; do
    probe=${spec%%:*}; pkg=${spec#*:}
    if [[ $probe == /* ]]; then [ -e "$probe" ] && continue
    else command -v "$probe" >/dev/null 2>&1 && continue; fi
    missing+=("$pkg")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "== apt-get install ${missing[*]}" >&2
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# new_pin FILE LENGTH -- a random alphanumeric PIN, kept if FILE exists
new_pin() {
  local file=$1 len=${2:-16}
  if [ ! -s "$file" ]; then
    (umask 077; python3 -c 'import secrets,string,sys; a=string.ascii_letters+string.digits; print("".join(secrets.choice(a) for _ in range(int(sys.argv[1]))), end="")' "$len" >"$file")
  fi
  chmod 600 "$file"
}

# state_dir DIR -- absolute path, created 0700
state_dir() {
  [ -n "${1:-}" ] || die "usage: $(basename "$0") start|stop|env DIR"
  mkdir -p "$1"; chmod 700 "$1"
  (cd "$1" && pwd)
}

# write_env DIR KEY=VALUE ... -- DIR/env (sourceable) and stdout
write_env() {
  local dir=$1; shift
  : >"$dir/env.tmp"
  for kv in "$@"; do printf '%s\n' "$kv" >>"$dir/env.tmp"; done
  mv "$dir/env.tmp" "$dir/env"
  cat "$dir/env"
}

# free_port -- a free TCP port on 127.0.0.1 (and the next one)
free_port() {
  python3 - <<'PY'
import socket
while True:
    s = socket.socket(); s.bind(("127.0.0.1", 0)); p = s.getsockname()[1]; s.close()
    t = socket.socket()
    try:
        t.bind(("127.0.0.1", p + 1)); t.close(); print(p); break
    except OSError:
        t.close()
PY
}

# stop_pid FILE -- stop the process whose id FILE holds (started by us), wait for it
stop_pid() {
  local f=$1 pid
  [ -s "$f" ] || return 0
  pid=$(cat "$f")
  if kill -0 "$pid" 2>/dev/null; then
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  fi
  rm -f "$f"
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

multiarch() { dpkg-architecture -qDEB_HOST_MULTIARCH 2>/dev/null || echo x86_64-linux-gnu; }

# wait_while TIMEOUT_S WHAT CMD... -- poll until CMD fails (another run holds a machine-wide
# resource: the NSS registration, openCryptoki's one configuration); give up after TIMEOUT_S
wait_while() {
  local timeout=$1 what=$2; shift 2
  local deadline=$((SECONDS + timeout)) said=
  while "$@"; do
    [ $SECONDS -lt $deadline ] || die "$what still in use after ${timeout}s; stop it first"
    [ -n "$said" ] || { echo "== waiting: $what is in use by another run" >&2; said=1; }
    sleep 1
  done
}

# machine_lock NAME -- hold an exclusive lock (fd 9) until this script exits
machine_lock() {
  local dir=/run/lock; [ -w "$dir" ] || dir=${TMPDIR:-/tmp}
  exec 9>"$dir/hsmflash-$1.lock"
  flock 9
}
