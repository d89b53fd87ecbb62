#!/usr/bin/env python3
"""Independent check of a `vitalmq export` directory (tests/export.rs).

  export_check.py DIR --key DEVICE=ALG:PUBLIC_HEX [...]

Reads every file as JSON lines, checks each data file's lines, bytes and SHA-256
against manifest.json, each raw message's SHA-256 against its bytes, and each COSE_Sign1
signature with pycose under the device's public key (EdDSA: raw 32 bytes; ES256: the
65-byte uncompressed point). Prints a JSON summary; exits 1 on the first mismatch.

Needs: pip install pycose 'cbor2<6'.
"""
import argparse
import base64
import hashlib
import json
import os
import sys

import cbor2
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import P256, Ed25519
from pycose.messages import CoseMessage


def fail(msg):
    print(msg, file=sys.stderr)
    sys.exit(1)


def public_key(alg, public_hex):
    raw = bytes.fromhex(public_hex)
    if alg == "EdDSA":
        return OKPKey(crv=Ed25519, x=raw)
    return EC2Key(crv=P256, x=raw[1:33], y=raw[33:])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("dir")
    ap.add_argument("--key", action="append", default=[])
    args = ap.parse_args()
    keys = {}
    for k in args.key:
        dev, spec = k.split("=", 1)
        alg, hexkey = spec.split(":", 1)
        keys[dev] = (alg, hexkey)

    with open(os.path.join(args.dir, "manifest.json"), "rb") as f:
        manifest = json.loads(f.read())
    if manifest.get("format") != "vitalmq-export/v1":
        fail(f"manifest format {manifest.get('format')!r}")
    lines = {}
    for entry in manifest["files"]:
        with open(os.path.join(args.dir, entry["name"]), "rb") as f:
            data = f.read()
        if hashlib.sha256(data).hexdigest() != entry["sha256"]:
            fail(f"{entry['name']}: sha256 differs from the manifest")
        if len(data) != entry["bytes"]:
            fail(f"{entry['name']}: {len(data)} bytes, manifest says {entry['bytes']}")
        rows = [json.loads(l) for l in data.decode("utf-8").splitlines()]
        if len(rows) != entry["lines"]:
            fail(f"{entry['name']}: {len(rows)} lines, manifest says {entry['lines']}")
        lines[entry["name"]] = rows

    verified = 0
    for row in lines["raw.jsonl"]:
        raw = base64.b64decode(row["cose_sign1_base64"])
        if hashlib.sha256(raw).hexdigest() != row["sha256"] or len(raw) != row["length"]:
            fail(f"{row['event_id']}: raw bytes do not match their sha256/length")
        msg = CoseMessage.decode(raw)
        alg, hexkey = keys[row["device"]]
        msg.key = public_key(alg, hexkey)
        if not msg.verify_signature():
            fail(f"{row['event_id']}: the COSE signature does not verify")
        payload = cbor2.loads(msg.payload)
        if payload.get("dev") != row["device"] or payload.get("seq") != row["seq"]:
            fail(f"{row['event_id']}: signed payload names another message")
        verified += 1

    events = {e["event_id"]: e for e in lines["events.jsonl"]}
    for row in lines["raw.jsonl"]:
        if events[row["event_id"]]["provenance"]["raw_sha256"] != row["sha256"]:
            fail(f"{row['event_id']}: normalized provenance names another raw message")
    for e in lines["events.jsonl"]:
        if e["patient_ref"] != manifest["patient_ref"]:
            fail(f"{e['event_id']}: another patient's event")

    print(json.dumps({
        "patient_ref": manifest["patient_ref"],
        "counts": {name: len(rows) for name, rows in lines.items()},
        "signatures_verified": verified,
    }))


if __name__ == "__main__":
    main()
