"""Reads sealed telemetry objects back, independently of vitalmq's code.

Usage: sealed_objects.py dir ROOT ABSENT [ABSENT ...]
       sealed_objects.py s3 ENDPOINT BUCKET ABSENT [ABSENT ...]

Lists every object (files under ROOT, or every key of BUCKET read with boto3) and
checks, for each telemetry object (under raw/ or normalized/):
  - its name ends in .vmqs (sealed),
  - its bytes start with the sealed header of keyring/src/sealed.rs: b"VMQS", format
    byte 1, a one-byte subject length, the subject (ASCII), a 4-byte key version,
  - none of the ABSENT byte strings (plaintext values only one patient produced)
    occurs anywhere in its bytes.
Exits 1 naming the offending object if a check fails; otherwise prints one JSON object:
{"objects": {name: {"subject": ..., "key_version": ...}}, "subjects": [...]}.
"""

import json
import os
import struct
import sys


def header(name, body):
    if body[:4] != b"VMQS" or len(body) < 6 or body[4] != 1:
        sys.exit(f"{name}: does not start with the VMQS sealed header")
    n = body[5]
    subject = body[6 : 6 + n].decode("ascii")
    (version,) = struct.unpack(">I", body[6 + n : 10 + n])
    return subject, version


def objects_in_dir(root):
    for base, _dirs, files in os.walk(root):
        for f in files:
            path = os.path.join(base, f)
            with open(path, "rb") as fh:
                yield os.path.relpath(path, root), fh.read()


def objects_in_s3(endpoint, bucket):
    import boto3

    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    for o in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
        yield o["Key"], s3.get_object(Bucket=bucket, Key=o["Key"])["Body"].read()


def main():
    if sys.argv[1] == "dir":
        found, absent = objects_in_dir(sys.argv[2]), sys.argv[3:]
    else:
        found, absent = objects_in_s3(sys.argv[2], sys.argv[3]), sys.argv[4:]
    out = {}
    for name, body in found:
        parts = name.split("/")
        if "raw" not in parts and "normalized" not in parts:
            continue
        if not name.endswith(".vmqs"):
            sys.exit(f"{name}: a telemetry object not sealed")
        for value in absent:
            if value.encode() in body:
                sys.exit(f"{name}: holds the plaintext {value!r}")
        subject, version = header(name, body)
        out[name] = {"subject": subject, "key_version": version}
    subjects = sorted({o["subject"] for o in out.values()})
    print(json.dumps({"objects": out, "subjects": subjects}))


main()
