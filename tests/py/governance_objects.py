"""Reads the objects of local object sinks back, independently of vitalmq's code.

Usage: governance_objects.py DIR [DIR ...]
       governance_objects.py --pseudonyms KEY_FILE PURPOSE CARE_DIR OTHER_DIR

Prints one JSON object: per directory, the normalized events it holds (counted per
device), the set of keys they carry, the latest observed_at (ms since the Unix epoch)
per device, and whether the directory holds any raw/ object.

With --pseudonyms: each event of OTHER_DIR that carries patient_ref is matched by
event_id to the care event, and its patient_ref compared with the purpose's pseudonym
of the care patient_ref, computed here from the description in
policies/src/pseudonym.rs: 'pt-' + the first 16 bytes (hex) of
HMAC-SHA256(key, b'vitalmq-pseudonym/v1\\0' + purpose + b'\\0' + care_ref).
"""

import hashlib
import hmac
import json
import os
import sys
from datetime import datetime


def ms(rfc3339):
    return round(datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp() * 1000)


def read(root):
    per_device = {}
    keys = set()
    latest = {}
    observed = {}
    ids = set()
    for base, _dirs, files in os.walk(os.path.join(root, "normalized")):
        for name in files:
            if not name.endswith(".ndjson"):
                continue
            with open(os.path.join(base, name), encoding="utf-8") as f:
                for line in f:
                    event = json.loads(line)
                    keys.update(event.keys())
                    ids.add(event["event_id"])
                    device = event.get("device", "?")
                    per_device[device] = per_device.get(device, 0) + 1
                    if "observed_at" in event:
                        t = ms(event["observed_at"])
                        latest[device] = max(latest.get(device, 0), t)
                        observed.setdefault(device, []).append(t)
    raw = os.path.isdir(os.path.join(root, "raw")) and any(
        files for _b, _d, files in os.walk(os.path.join(root, "raw"))
    )
    return {
        "events": per_device,
        "distinct_event_ids": len(ids),
        "keys": sorted(keys),
        "latest_observed_ms": latest,
        "observed_ms": {d: sorted(v) for d, v in observed.items()},
        "raw_objects": raw,
    }


def events(root):
    for base, _dirs, files in os.walk(os.path.join(root, "normalized")):
        for name in files:
            if name.endswith(".ndjson"):
                with open(os.path.join(base, name), encoding="utf-8") as f:
                    for line in f:
                        yield json.loads(line)


def pseudonyms(key_file, purpose, care_dir, other_dir):
    key = open(key_file, "rb").read()
    care = {e["event_id"]: e["patient_ref"] for e in events(care_dir)}
    checked = mismatched = care_refs = 0
    linked = {}
    for e in events(other_dir):
        if "patient_ref" not in e:
            continue
        ref = care[e["event_id"]]
        msg = b"vitalmq-pseudonym/v1\0" + purpose.encode() + b"\0" + ref.encode()
        expected = "pt-" + hmac.new(key, msg, hashlib.sha256).digest()[:16].hex()
        checked += 1
        mismatched += e["patient_ref"] != expected
        care_refs += e["patient_ref"] in care.values()
        linked.setdefault(e["patient_ref"], set()).add(e["device"])
    return {
        "checked": checked,
        "mismatched": mismatched,
        "care_refs_seen": care_refs,
        "distinct_pseudonyms": len(linked),
    }


if sys.argv[1] == "--pseudonyms":
    print(json.dumps(pseudonyms(*sys.argv[2:6])))
else:
    print(json.dumps({root: read(root) for root in sys.argv[1:]}))
