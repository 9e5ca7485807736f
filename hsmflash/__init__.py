"""hsmflash: ESP32 firmware keys kept in a PKCS#11 token.

The map, one line per module, in the order data flows (imports run from the bottom layers up;
nothing below `cli/` prints, prompts or exits):

    errors.py              one root error, one subclass per fault, each with its exit code
    chips.py               per-chip facts: flash-encryption and Secure Boot schemes, key blocks
    keytypes.py            key types and usages (pure data: policies are checked without a token)
    fileio.py              the one atomic write; inputs read with errors that name the file
    formats/               pure and token-free, each with its vectors or oracle in tests/
      primitives.py        the signer/cipher shapes, public-key DER, fingerprints, the one
                           raw-signature verifier and the one public-key loader
      kdf.py               per-device key derivation `aes-ecb-v1` (the spec)
      flashcrypt.py        flash encryption: XTS-AES (keys anywhere), ESP32 classic, C2's 128-bit
      images.py            esptool's image rules, restated (held to esptool's parser in tests)
      secureboot.py        Secure Boot V2/V1 signature blocks, digests, verification
      partitions.py        ESP-IDF partition tables (binary, CSV), protection rules, templates
      appimage.py          the signed MicroPython app image `hsmflash-app-v1`
      vfs.py               the LittleFS image MicroPython's esp32 port mounts
      x509.py              certificates, CSRs and CRLs whose signature is made in a token
      revocation.py        the signed device revocation list (verified with the public key)
    token/                 the PKCS#11 layer
      session.py           module, token lookup, RFC 7512 key URIs, PIN handler, the session
      keys.py              key lookup, generation, import, public halves
      profile.py           what a token can do, found by trying once per token, cached
      rawderive.py         batch derivation through the C API (KCV manifests for whole lots)
    policy.py              policies: loading is validating; which key, chip, export is allowed
    audit.py               the tamper-evident log: hash chain, tags, checkpoints, verification
    keyuse.py              THE choke point: Station.use() checks the policy (and every export),
                           writes the intent, yields KeyUse (the only handle that signs,
                           encrypts, derives or exports), records the outcome
    keys.py                capability: generate, import, create the policy's keys (audited)
    derive.py              capability: per-device keys as KCVs, one device or a whole lot
    sign.py                capability: sign firmware images for Secure Boot
    encrypt.py             capability: encrypt/decrypt images for a device or a stored key
                           (the one flash-encryption path from a derived key; batches)
    credentials.py         capability: per-device secrets and certificates in encrypted NVS
    ca.py                  capability: the device CA in the token, certificates, CRLs
    app/                   capability: the MicroPython app
      build.py             sources -> .mpy -> ROMFS -> signed app image
      bootcode.py          the boot verifier to freeze into the firmware (boot/hsmboot.py)
      lockdown.py          the lockdown report: every channel, closed / open / unknown
    device/                one chip: base (the shape), virtual (espefuse's emulator + a flash
                           file), serial (esptool: stub, baud, Secure Download Mode)
    hazmat/efuse.py        irreversible eFuse writes, each behind `confirm=True`
    provision/             from blank chip to locked device
      inputs.py            images at addresses, the app and vfs placed by the table
      proof.py             every image and address proven before the first burn
      plan.py              the pure planner: eFuse state + expected check values -> Plan
      execute.py           the executor: audited steps, encrypt in the token, write, verify
      provisioner.py       plan, burn keys, write, enable, close download mode last
      reflash.py           field updates and RMA (holds an executor): no eFuse writes
      manifest.py          the per-device manifest (CSV or JSON Lines), written and read back
      pool.py              station mode: one worker process per device
    cli/                   the edge: parsing, the PIN prompt, output, error -> exit code
      main.py              the Typer app, global options (before or after the command)
      context.py           global options, PIN handler, policy/token access, --json output
      token, keys, policy, sign, encrypt, audit, devices, credentials, ca, app, app_check,
      partitions           one module per command group; progress.py: the station's table
    devtools/              the quick start's demo and the development SoftHSM token
"""

__version__ = "0.1.0"
