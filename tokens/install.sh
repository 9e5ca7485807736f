#!/usr/bin/env bash
# Installs the Debian packages of every token in the matrix (NSS softokn + p11-kit,
# openCryptoki, tpm2-pkcs11 on swtpm + tpm2-abrmd, p11-kit remoting). Idempotent: apt runs
# (after `apt-get update`) only when a package is missing. Run by .ci/run; each
# tokens/X.sh also installs its own packages when missing.
source "$(dirname "$0")/lib.sh"
ma=$(multiarch)
need_pkgs softhsm2-util:softhsm2 \
  "/usr/lib/$ma/libsoftokn3.so:libnss3" certutil:libnss3-tools \
  p11-kit:p11-kit "/usr/lib/$ma/p11-kit-proxy.so:p11-kit-modules" \
  pkcsslotd:opencryptoki \
  swtpm:swtpm swtpm_setup:swtpm-tools tpm2_startup:tpm2-tools tpm2-abrmd:tpm2-abrmd \
  "/usr/lib/$ma/libtss2-tcti-tabrmd.so.0:libtss2-tcti-tabrmd0" \
  "/usr/lib/$ma/libtss2-tcti-swtpm.so.0:libtss2-tcti-swtpm0" \
  "/usr/lib/$ma/pkcs11/libtpm2_pkcs11.so:libtpm2-pkcs11-1" \
  tpm2_ptool:libtpm2-pkcs11-tools dbus-daemon:dbus
