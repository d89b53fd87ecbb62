"""Reads the objects of local object sinks back, independently of vitalmq's code.

Usage: governance_objects.py DIR [DIR ...]

Prints one JSON object: per directory, the normalized events it holds (counted per
device), the set of keys they carry, the latest observed_at (ms since the Unix epoch)
per device, and whether the directory holds any raw/ object.
"""

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


print(json.dumps({root: read(root) for root in sys.argv[1:]}))
