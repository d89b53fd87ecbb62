"""Re-verifies, with pycose (an independent COSE implementation), every device signature
a FHIR Bundle's Provenance carries, with the device's public key read from the device
registry (`vitalmq-registry/v1` or `/v2` TOML: `[[devices]]` with `id`, `alg`,
`public_key`), and checks that the target Observations say what was signed.

    python3 fhir_pycose.py BUNDLE.json REGISTRY.toml

For each Provenance with `signature.sigFormat` = application/cose: base64-decodes
`signature.data`, verifies it under the key of the device `signature.who` names (which
must be the COSE kid), checks SHA-256(data) against the raw-message entity and each
target Observation's values and effectiveDateTime against the signed payload.
Prints a JSON summary; exits non-zero on any failure or when nothing was verified.
Needs: pip install pycose 'cbor2<6' fhir.resources (the latter not here).
"""
import base64
import datetime
import hashlib
import json
import sys
import tomllib
import urllib.parse

import cbor2
from pycose.headers import KID
from pycose.keys import EC2Key, OKPKey
from pycose.keys.curves import P256, Ed25519
from pycose.messages import CoseMessage

LOINC = {"59408-5": "spo2", "8867-4": "pulse", "9279-1": "resp", "8310-5": "temp",
         "8480-6": "sbp", "8462-4": "dbp"}
# The mapping's UCUM unit per metric (docs/fhir.md); an unlisted metric has none.
UCUM = {"spo2": "%", "pulse": "/min", "resp": "/min", "temp": "Cel", "sbp": "mm[Hg]",
        "dbp": "mm[Hg]"}


def problems(o):
    """What makes the claims ambiguous: value[x] next to component, another unit."""
    out = []
    value_x = [k for k in o if k.startswith("value")]
    if "component" in o and value_x:
        out.append(f"{value_x} together with component")
    for p in o.get("component") or [o]:
        q = p.get("valueQuantity")
        if q is None:
            continue
        for metric in claimed({"code": p["code"], "valueQuantity": q}, []):
            want = UCUM.get(metric)
            have = (q.get("system"), q.get("code"))
            if have != (("http://unitsofmeasure.org", want) if want else (None, None)):
                out.append(f"{metric}: unit {have}, the mapping's {want}")
    return out


def public_key(alg, public_hex):
    raw = bytes.fromhex(public_hex)
    if alg == "EdDSA":
        return OKPKey(crv=Ed25519, x=raw)
    return EC2Key(crv=P256, x=raw[1:33], y=raw[33:])


# The mapping's codings (system, code) per metric (docs/fhir.md): a reading is the signed
# one only when its code.coding is exactly this set (no coding added or recoded).
L = "http://loinc.org"
CODINGS = {"spo2": {(L, "59408-5"), (L, "2708-6")}, "pulse": {(L, "8867-4")},
           "resp": {(L, "9279-1")}, "temp": {(L, "8310-5")}, "sbp": {(L, "8480-6")},
           "dbp": {(L, "8462-4")}}
PANEL = {(L, "85354-9")}
DEVICE_TIME = "urn:vitalmq:fhir:extension:device-time"


def metric_of(code, errors):
    """The metric a code's codings name: all of them, as the mapping gives them."""
    have = {(c.get("system"), c.get("code")) for c in code.get("coding", [])}
    for metric, want in CODINGS.items():
        if have == want:
            return metric
    if len(have) == 1:
        system, value = next(iter(have))
        if system == "urn:vitalmq:metric" and value not in CODINGS:
            # The mapping's safe code: the name itself, else percent-encoded ("%": "").
            return "" if value == "%" else urllib.parse.unquote(value)
    errors.append(f"codings {sorted(have, key=str)} are not the mapping's")
    return None


def claimed(o, errors):
    out = {}
    if "component" in o:
        have = {(c.get("system"), c.get("code")) for c in o["code"].get("coding", [])}
        if have != PANEL:
            errors.append(f"panel codings {sorted(have, key=str)} are not the mapping's")
        parts = o["component"]
        if [metric_of(p["code"], []) for p in parts] != ["sbp", "dbp"]:
            errors.append("the panel's components are not systolic then diastolic")
    else:
        parts = [o]
    for p in parts:
        metric = metric_of(p["code"], errors)
        extra = [k for k in p if k.startswith("value") and k != "valueQuantity"]
        if extra:
            errors.append(f"{metric}: {extra} is not the mapping's")
        if metric:
            out[metric] = p.get("valueQuantity", {}).get("value")
    return out


def main(bundle_path, registry_path):
    with open(registry_path, "rb") as f:
        keys = {d["id"]: (d["alg"], d["public_key"]) for d in tomllib.load(f)["devices"]}
    with open(bundle_path, encoding="utf-8") as f:
        bundle = json.load(f)
    by_url = {e["fullUrl"]: e["resource"] for e in bundle["entry"]}
    by_key = {i["value"]: e["resource"] for e in bundle["entry"]
              for i in e["resource"].get("identifier", [])
              if isinstance(i, dict) and i.get("system") == "urn:vitalmq:observation"}
    errors, verified, values = [], 0, 0
    for e in bundle["entry"]:
        p = e["resource"]
        if p["resourceType"] != "Provenance":
            continue
        for sig in p.get("signature", []):
            if sig.get("sigFormat") != "application/cose":
                continue
            data = base64.b64decode(sig["data"])
            device = sig["who"]["identifier"]["value"]
            msg = CoseMessage.decode(data)
            kid = (msg.uhdr.get(KID) or b"").decode()
            if kid != device:
                errors.append(f"{e['fullUrl']}: kid {kid} is not the signer {device}")
                continue
            alg, public = keys[device]
            msg.key = public_key(alg, public)
            if not msg.verify_signature():
                errors.append(f"{e['fullUrl']}: the signature does not verify")
                continue
            verified += 1
            sha = hashlib.sha256(data).hexdigest()
            entity = [x["what"]["identifier"]["value"] for x in p.get("entity", [])
                      if x["what"].get("identifier", {}).get("system") == "urn:vitalmq:raw-sha256"]
            if entity != [sha]:
                errors.append(f"{e['fullUrl']}: entity {entity} is not SHA-256 {sha}")
            payload = cbor2.loads(msg.payload)
            signed = payload.get("m", {})
            try:
                when = datetime.datetime.fromtimestamp(payload["ts"] / 1000, datetime.timezone.utc)
            except (OverflowError, OSError, ValueError):
                # Beyond what a date can say (SPEC allows any u64): the mapping dates it
                # by the bridge and keeps the signed ts in the device-time extension.
                when = None
            seen = {}
            for t in p["target"]:
                name = t.get("reference") or json.dumps(t.get("identifier"))
                o = by_url.get(t.get("reference")) or by_key.get(
                    (t.get("identifier") or {}).get("value"))
                if o is None:
                    continue  # not in the file: not checked here
                device_time = [x.get("valueString") for x in o.get("extension", [])
                               if x.get("url") == DEVICE_TIME]
                if when is None:
                    if device_time != [str(payload["ts"])]:
                        errors.append(f"{name}: device time {device_time} is not ts {payload['ts']}")
                else:
                    effective = datetime.datetime.fromisoformat(
                        o["effectiveDateTime"].replace("Z", "+00:00"))
                    if effective != when:
                        errors.append(f"{name}: effective {effective} is not ts {when}")
                    if device_time:
                        errors.append(f"{name}: a device-time extension for a datable ts")
                errors.extend(f"{name}: {x}" for x in problems(o))
                found = []
                seen.update(claimed(o, found))
                errors.extend(f"{name}: {x}" for x in found)
            for metric, value in seen.items():
                values += 1
                if metric not in signed and value is None:
                    continue
                if signed.get(metric) != value:
                    errors.append(f"{e['fullUrl']}: {metric} says {value}, signed {signed.get(metric)}")
            for metric in signed:
                if metric not in seen:
                    errors.append(f"{e['fullUrl']}: signed {metric} is in no Observation")
    print(json.dumps({"verified": verified, "values": values, "errors": errors}))
    return 1 if errors or verified == 0 else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
