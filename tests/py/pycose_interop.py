#!/usr/bin/env python3
"""pycose side of the envelope interop tests (tests/pycose_interop.rs).

pycose is an independent COSE implementation; this script signs and verifies
telemetry with it so the Rust tests can check that both agree, both ways.

  verify --alg EdDSA|ES256 --public-hex HEX FILE   -> {"valid": bool, "kid": str, "payload": {...}}
  sign --alg EdDSA|ES256 --kid ID --payload-json JSON -> {"cose_hex": ..., "public_hex": ...}

Needs: pip install pycose 'cbor2<6' (pycose 1.1.0 cannot decode tagged messages with cbor2 6).
"""
import argparse
import json
import sys

import cbor2
from pycose.algorithms import EdDSA, Es256
from pycose.headers import KID, Algorithm
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import P256, Ed25519
from pycose.messages import CoseMessage, Sign1Message


def public_key(alg, public_hex):
    raw = bytes.fromhex(public_hex)
    if alg == "EdDSA":
        return OKPKey(crv=Ed25519, x=raw)
    if len(raw) != 65 or raw[0] != 4:
        raise SystemExit("ES256 public key must be the 65-byte uncompressed point")
    return EC2Key(crv=P256, x=raw[1:33], y=raw[33:])


def jsonable(value):
    if isinstance(value, bytes):
        return {"bstr": value.hex()}
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [jsonable(v) for v in value]
    return value


def cmd_verify(args):
    with open(args.file, "rb") as f:
        data = f.read()
    msg = CoseMessage.decode(data)
    msg.key = public_key(args.alg, args.public_hex)
    try:
        valid = bool(msg.verify_signature())
    except Exception as exc:  # pycose raises on malformed signatures
        print(f"pycose verify raised: {exc!r}", file=sys.stderr)
        valid = False
    kid = msg.uhdr.get(KID) or msg.phdr.get(KID)
    print(json.dumps({
        "valid": valid,
        "alg": getattr(msg.phdr.get(Algorithm), "fullname", str(msg.phdr.get(Algorithm))),
        "kid": kid.decode() if isinstance(kid, bytes) else kid,
        "payload": jsonable(cbor2.loads(msg.payload)),
    }))


def cmd_sign(args):
    if args.alg == "EdDSA":
        key = OKPKey.generate_key(crv=Ed25519)
        public = key.x
        alg = EdDSA
    else:
        key = EC2Key.generate_key(crv=P256)
        public = b"\x04" + key.x + key.y
        alg = Es256
    payload = json.loads(args.payload_json)
    msg = Sign1Message(phdr={Algorithm: alg}, uhdr={KID: args.kid.encode()},
                       payload=cbor2.dumps(payload))
    msg.key = key
    encoded = msg.encode()  # tagged (18) by default
    print(json.dumps({"cose_hex": encoded.hex(), "public_hex": public.hex()}))


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("verify")
    v.add_argument("--alg", choices=["EdDSA", "ES256"], required=True)
    v.add_argument("--public-hex", required=True)
    v.add_argument("file")
    s = sub.add_parser("sign")
    s.add_argument("--alg", choices=["EdDSA", "ES256"], required=True)
    s.add_argument("--kid", required=True)
    s.add_argument("--payload-json", required=True)
    args = parser.parse_args()
    {"verify": cmd_verify, "sign": cmd_sign}[args.cmd](args)


if __name__ == "__main__":
    main()
