"""Validates FHIR JSON with an independent implementation of the R4 StructureDefinitions:
the `fhir.resources` models of R4B (generated from the official definitions; R4B keeps
R4's Observation, Device, Provenance, DetectedIssue, Task, Communication and Bundle).

    python3 fhir_validate.py FILE...   FILE: a Bundle or resource (.json), or NDJSON
                                       (.ndjson, one resource per line)

Parses every resource on its own and every Bundle whole; checks the vital-signs profile
rules the base models do not (category, LOINC and UCUM codes, the BP components) and
that every `urn:uuid:` reference is the fullUrl of an entry of the same Bundle (a server
refuses a transaction with an unresolvable placeholder; a lone resource has none); prints one JSON summary line and exits non-zero on any error.
"""
import json
import sys

from fhir.resources.R4B import get_fhir_model_class

VITALS = {
    "http://hl7.org/fhir/StructureDefinition/oxygensat": ("2708-6", "%"),
    "http://hl7.org/fhir/StructureDefinition/heartrate": ("8867-4", "/min"),
    "http://hl7.org/fhir/StructureDefinition/resprate": ("9279-1", "/min"),
    "http://hl7.org/fhir/StructureDefinition/bodytemp": ("8310-5", "Cel"),
}
BP = "http://hl7.org/fhir/StructureDefinition/bp"

# The R4 value sets with required binding that the models do not enforce.
REQUIRED = {
    ("Observation", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                "cancelled", "entered-in-error", "unknown"},
    ("Device", "status"): {"active", "inactive", "entered-in-error", "unknown"},
    ("DetectedIssue", "status"): {"registered", "preliminary", "final", "amended", "corrected",
                                  "cancelled", "entered-in-error", "unknown"},
    ("DetectedIssue", "severity"): {"high", "moderate", "low"},
    ("Task", "status"): {"draft", "requested", "received", "accepted", "rejected", "ready",
                         "cancelled", "in-progress", "on-hold", "failed", "completed",
                         "entered-in-error"},
    ("Task", "intent"): {"unknown", "proposal", "plan", "order", "original-order",
                         "reflex-order", "filler-order", "instance-order", "option"},
    ("Task", "priority"): {"routine", "urgent", "asap", "stat"},
    ("Communication", "status"): {"preparation", "in-progress", "not-done", "on-hold",
                                  "stopped", "completed", "entered-in-error", "unknown"},
    ("Communication", "priority"): {"routine", "urgent", "asap", "stat"},
    ("Bundle", "type"): {"document", "message", "transaction", "transaction-response", "batch",
                         "batch-response", "history", "searchset", "collection"},
}
ENTITY_ROLES = {"derivation", "revision", "quotation", "source", "removal"}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH"}


def vital_signs_errors(o):
    """The R4 vital-signs profile's constraints (vs-1..3 and the per-profile codes)."""
    errors = []
    profiles = o.get("meta", {}).get("profile", [])
    if not profiles:
        return errors
    cats = [c for cc in o.get("category", []) for c in cc.get("coding", [])]
    if not any(c.get("code") == "vital-signs" and c.get("system") ==
               "http://terminology.hl7.org/CodeSystem/observation-category" for c in cats):
        errors.append("vital-signs category missing")
    if "effectiveDateTime" not in o and "effectivePeriod" not in o:
        errors.append("effective[x] missing")
    if "subject" not in o:
        errors.append("subject missing")
    codes = {c.get("code") for c in o["code"].get("coding", []) if c.get("system") == "http://loinc.org"}
    for p in profiles:
        if p in VITALS:
            code, unit = VITALS[p]
            if code not in codes:
                errors.append(f"{p}: LOINC {code} missing")
            q = o.get("valueQuantity")
            if q is None and "dataAbsentReason" not in o:
                errors.append(f"{p}: neither value nor dataAbsentReason")
            if q is not None and (q.get("code") != unit or q.get("system") != "http://unitsofmeasure.org"):
                errors.append(f"{p}: unit {q.get('code')} is not UCUM {unit}")
        elif p == BP:
            if "85354-9" not in codes:
                errors.append("bp: LOINC 85354-9 missing")
            comps = {c["code"]["coding"][0]["code"]: c for c in o.get("component", [])}
            for part in ("8480-6", "8462-4"):
                c = comps.get(part)
                if c is None:
                    errors.append(f"bp: component {part} missing")
                elif "valueQuantity" in c:
                    if c["valueQuantity"].get("code") != "mm[Hg]":
                        errors.append(f"bp: {part} unit is not mm[Hg]")
                elif "dataAbsentReason" not in c:
                    errors.append(f"bp: {part} has neither value nor dataAbsentReason")
        else:
            errors.append(f"unexpected profile {p}")
    return errors


def check(resource, where, counts, errors):
    rt = resource.get("resourceType")
    try:
        get_fhir_model_class(rt).model_validate(resource)
    except Exception as e:  # noqa: BLE001 - any validation failure is reported
        errors.append(f"{where} {rt}: {e}")
        return
    counts[rt] = counts.get(rt, 0) + 1
    for (t, field), allowed in REQUIRED.items():
        if t == rt and field in resource and resource[field] not in allowed:
            errors.append(f"{where} {rt}.{field} {resource[field]!r} not in its required value set")
    for e in resource.get("entity", []) if rt == "Provenance" else []:
        if e.get("role") not in ENTITY_ROLES:
            errors.append(f"{where} Provenance.entity.role {e.get('role')!r}")
    for e in resource.get("entry", []) if rt == "Bundle" else []:
        if "request" in e and e["request"].get("method") not in METHODS:
            errors.append(f"{where} Bundle.entry.request.method {e['request'].get('method')!r}")
    if rt == "Observation":
        errors.extend(f"{where} Observation: {e}" for e in vital_signs_errors(resource))
    subject = resource.get("subject") or resource.get("patient") or resource.get("for")
    if subject is not None and subject.get("identifier", {}).get("system") != "urn:vitalmq:patient-pseudonym":
        errors.append(f"{where} {rt}: the patient is not referenced by pseudonym")
    if rt == "Bundle":
        for i, e in enumerate(resource.get("entry", [])):
            check(e["resource"], f"{where} entry {i}", counts, errors)


def references(value):
    """Every `reference` string inside a JSON value."""
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "reference" and isinstance(v, str):
                yield v
            else:
                yield from references(v)
    elif isinstance(value, list):
        for v in value:
            yield from references(v)


def unresolved(doc):
    """The `urn:uuid:` references of `doc` no entry of the same Bundle has as fullUrl."""
    entries = doc.get("entry", []) if doc.get("resourceType") == "Bundle" else []
    local = {e.get("fullUrl") for e in entries}
    resources = [e.get("resource", {}) for e in entries] if entries else [doc]
    return sorted({r for res in resources for r in references(res)
                   if r.startswith("urn:uuid:") and r not in local})


def check_document(doc, where, counts, errors):
    check(doc, where, counts, errors)
    errors.extend(f"{where}: unresolvable placeholder reference {r}" for r in unresolved(doc))


def main(paths):
    counts, errors = {}, []
    for path in paths:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".ndjson"):
                for n, line in enumerate(f, 1):
                    check_document(json.loads(line), f"{path}:{n}", counts, errors)
            else:
                check_document(json.load(f), path, counts, errors)
    print(json.dumps({"counts": counts, "errors": errors}))
    return 1 if errors or not counts else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
