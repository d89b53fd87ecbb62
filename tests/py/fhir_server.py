"""A stand-in FHIR R4 server for the FHIR sink's tests: an OAuth 2.0 token endpoint and
a transaction endpoint that validates every resource with the `fhir.resources` R4B
models (through fhir_validate.py: the models plus the vital-signs profile rules).

    python3 fhir_server.py CLIENT_ID SECRET_FILE TOKEN_TTL_S

Binds 127.0.0.1 on a free port and prints "fhir listening on 127.0.0.1:PORT".

  POST /token   client credentials (RFC 6749 4.4): HTTP Basic client authentication
                (form-urlencoded id and secret), grant_type=client_credentials; issues a
                bearer token living TOKEN_TTL_S seconds. Else 401 invalid_client.
  POST /fhir    a `transaction` Bundle, under a valid bearer token (else 401). Every
                entry's resource is validated (400 + OperationOutcome on any error,
                nothing applied: transactions are atomic). Conditional creates
                (ifNoneExist: `identifier=system|value`) answer 200 for an existing
                match, else create (201), 412 for more than one match (the query
                parsed as a real server does: URL-decoded, `,` an OR, `\\,` `\\|`
                `\\$` `\\\\` escapes); conditional updates (PUT Type?identifier=...)
                replace the match or create; PUT Type/id (the resource's id must be
                that id) creates or updates that id, as a real server's update-as-create.
                Like HAPI (HAPI-2498) and Azure, a search parameter with a modifier or
                chain (`entity:identifier=`, `target:identifier=`) is refused: 400; so
                is a `urn:uuid:` reference to no entry of the Bundle.
  GET  /_dump   counts: resources per type, stored resources per the identifier
                search (or `Type/id`) they were created under (a duplicate shows as 2), created/existing/refused answers, validation
                errors, and every Observation's identifiers.
  POST /_down?mode=503|close|lost, POST /_up
                an outage: answer 503, close the connection unanswered, or apply the
                transaction and then close unanswered (a lost answer: the client must
                send it again and get 200s, not duplicates).
"""
import base64
import json
import os
import sys
import threading
import time
import urllib.parse
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import fhir_validate  # noqa: E402 - the shared R4B validation

CLIENT_ID = sys.argv[1]
with open(sys.argv[2], encoding="utf-8") as f:
    SECRET = f.read().strip()
TOKEN_TTL = float(sys.argv[3])

LOCK = threading.Lock()
TOKENS = {}  # token -> expiry (monotonic)
STORE = {}  # resource type -> list of resources
CREATED = {}  # "Type|<search>" a resource was created under -> how many stored
STATE = {"down": None, "created": 0, "existing": 0, "updated": 0, "transactions": 0,
         "refused_validation": 0, "refused_token": 0, "validation_errors": [],
         "unconditional": 0, "lost": 0, "refused_unsupported": 0, "unsupported": []}


class Unsupported(ValueError):
    """A request a real server refuses (400)."""


def identifiers_of(resource, param):
    """The (system, value) pairs a search parameter reaches in a stored resource."""
    if param != "identifier":
        raise Unsupported(f"HAPI-2498: unsupported search parameter {param!r}")
    ids = resource.get("identifier", [])
    ids = ids if isinstance(ids, list) else [ids]
    return {(i.get("system"), i.get("value")) for i in ids if i}


def refused(bundle):
    """What a real server refuses before applying anything: modifiers and chains in
    conditional requests, a PUT Type/id whose resource has another id, a `urn:uuid:`
    reference that is no entry's fullUrl (HAPI: 400, placeholder not resolvable)."""
    out = [f"unresolvable placeholder reference {r}" for r in fhir_validate.unresolved(bundle)]
    for e in bundle["entry"]:
        resource, request = e["resource"], e["request"]
        queries = [request.get("ifNoneExist") or ""]
        url, _, query = request["url"].partition("?")
        queries.append(query)
        for q in queries:
            param = q.partition("=")[0]
            if q and param != "identifier":
                out.append(f"HAPI-2498: unsupported search parameter {param!r} in {q!r}")
        if request["method"] == "PUT" and not query:
            rtype, _, rid = url.partition("/")
            if rtype != resource["resourceType"] or not rid or resource.get("id") != rid:
                out.append(f"PUT {url}: the resource's id is {resource.get('id')!r}")
    return out


def split_unescaped(text, sep):
    """Splits on `sep` not preceded by a backslash escape (FHIR search escaping)."""
    parts, cur, i = [], "", 0
    while i < len(text):
        c = text[i]
        if c == "\\" and i + 1 < len(text):
            cur += text[i:i + 2]
            i += 2
            continue
        if c == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += c
        i += 1
    parts.append(cur)
    return parts


def unescape(text):
    """`\\,` `\\|` `\\$` `\\\\` to the character."""
    out, i = "", 0
    while i < len(text):
        if text[i] == "\\" and i + 1 < len(text):
            out += text[i + 1]
            i += 2
        else:
            out += text[i]
            i += 1
    return out


def search(rtype, query):
    """Stored resources of `rtype` matching `param=system|value[,system|value...]`,
    parsed as a real server does: URL-decoded, OR on unescaped `,`, the system
    separator an unescaped `|`, escapes undone."""
    param, _, token = urllib.parse.unquote(query).partition("=")
    wanted = []
    for alt in split_unescaped(token, ","):
        parts = split_unescaped(alt, "|")
        if len(parts) > 2:
            raise Unsupported(f"token {alt!r} has more than one unescaped |")
        # `value` alone: any system.
        system = unescape(parts[0]) if len(parts) == 2 else None
        wanted.append((system, unescape(parts[-1])))

    def matches(r):
        have = identifiers_of(r, param)
        return any((s, v) in have if s is not None else any(v == hv for _, hv in have)
                   for s, v in wanted)
    return [r for r in STORE.get(rtype, []) if matches(r)]


class Ambiguous(ValueError):
    """A conditional request matching more than one resource (412)."""


def outcome(code, diagnostics, expression=None):
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    if expression:
        issue["expression"] = [expression]
    return {"resourceType": "OperationOutcome", "issue": [issue]}


def apply(bundle):
    """Applies a validated transaction; the response entries."""
    answers = []
    for e in bundle["entry"]:
        resource, request = e["resource"], e["request"]
        rtype = resource["resourceType"]
        if request["method"] == "POST":
            cond = request.get("ifNoneExist") or ""
            found = search(rtype, cond) if cond else []
            if not cond:
                STATE["unconditional"] += 1
            if len(found) > 1:
                raise Ambiguous(f"{rtype}?{cond} matches {len(found)}")
            if found:
                STATE["existing"] += 1
                answers.append({"status": "200 OK", "location": f"{rtype}/{found[0]['id']}"})
                continue
        elif "?" not in request["url"]:  # PUT Type/id: update-as-create
            query = request["url"]
            found = [r for r in STORE.get(rtype, []) if r["id"] == resource["id"]]
            if found:
                STORE[rtype] = [resource if r is found[0] else r for r in STORE[rtype]]
                STATE["updated"] += 1
                answers.append({"status": "200 OK", "location": request["url"]})
                continue
            STORE.setdefault(rtype, []).append(resource)
            CREATED[query] = CREATED.get(query, 0) + 1
            STATE["created"] += 1
            answers.append({"status": "201 Created", "location": request["url"]})
            continue
        else:  # PUT Type?identifier=...
            _, _, query = request["url"].partition("?")
            found = search(rtype, query)
            if len(found) > 1:
                raise Ambiguous(f"{rtype}?{query} matches {len(found)}")
            if found:
                resource = dict(resource, id=found[0]["id"])
                STORE[rtype] = [resource if r is found[0] else r for r in STORE[rtype]]
                STATE["updated"] += 1
                answers.append({"status": "200 OK", "location": f"{rtype}/{resource['id']}"})
                continue
        resource = dict(resource, id=str(uuid.uuid4()))
        STORE.setdefault(rtype, []).append(resource)
        key = f"{rtype}|{cond if request['method'] == 'POST' else query}"
        CREATED[key] = CREATED.get(key, 0) + 1
        STATE["created"] += 1
        answers.append({"status": "201 Created", "location": f"{rtype}/{resource['id']}"})
    return {"resourceType": "Bundle", "type": "transaction-response",
            "entry": [{"response": a} for a in answers]}


def dump():
    return {
        "resources": {t: len(rs) for t, rs in STORE.items()},
        "per_identifier": CREATED,
        "observations": [[f"{i['system']}|{i['value']}" for i in o.get("identifier", [])]
                         for o in STORE.get("Observation", [])],
        **{k: v for k, v in STATE.items() if k != "down"},
    }


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *_):
        pass

    def reply(self, status, body, content_type="application/fhir+json"):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def drop(self):
        self.close_connection = True
        self.connection.close()

    def body(self):
        return self.rfile.read(int(self.headers.get("Content-Length", 0)))

    def do_GET(self):
        if self.path == "/_dump":
            with LOCK:
                return self.reply(200, dump(), "application/json")
        self.reply(404, outcome("not-found", self.path))

    def do_POST(self):
        path, _, query = self.path.partition("?")
        body = self.body()
        with LOCK:
            if path == "/_down":
                STATE["down"] = urllib.parse.parse_qs(query).get("mode", ["503"])[0]
                return self.reply(200, {}, "application/json")
            if path == "/_up":
                STATE["down"] = None
                return self.reply(200, {}, "application/json")
            down = STATE["down"]
            if down == "503":
                return self.reply(503, outcome("transient", "down for maintenance"))
            if down == "close":
                return self.drop()
            if path == "/token":
                return self.token(body)
            if path == "/fhir":
                return self.transaction(body, lost=down == "lost")
        self.reply(404, outcome("not-found", self.path))

    def token(self, body):
        form = urllib.parse.parse_qs(body.decode())
        auth = self.headers.get("Authorization", "")
        ok = False
        if auth.startswith("Basic "):
            user, _, password = base64.b64decode(auth[6:]).decode().partition(":")
            ok = (urllib.parse.unquote_plus(user), urllib.parse.unquote_plus(password)) == (CLIENT_ID, SECRET)
        if not ok or form.get("grant_type") != ["client_credentials"]:
            return self.reply(401 if not ok else 400,
                              {"error": "invalid_client" if not ok else "unsupported_grant_type"},
                              "application/json")
        token = uuid.uuid4().hex
        TOKENS[token] = time.monotonic() + TOKEN_TTL
        self.reply(200, {"access_token": token, "token_type": "Bearer",
                         "expires_in": int(TOKEN_TTL)}, "application/json")

    def transaction(self, body, lost):
        auth = self.headers.get("Authorization", "")
        expiry = TOKENS.get(auth[7:]) if auth.startswith("Bearer ") else None
        if expiry is None or expiry < time.monotonic():
            STATE["refused_token"] += 1
            return self.reply(401, outcome("login", "missing or expired bearer token"))
        try:
            bundle = json.loads(body)
        except ValueError as e:
            return self.reply(400, outcome("structure", str(e)))
        counts, errors = {}, []
        if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
            errors.append("not a transaction Bundle")
        else:
            fhir_validate.check(bundle, "Bundle", counts, errors)
        if not errors:
            unsupported = refused(bundle)
            if unsupported:
                STATE["refused_unsupported"] += 1
                STATE["unsupported"].extend(unsupported[:20])
                return self.reply(400, outcome("not-supported", "; ".join(unsupported[:5])))
        if errors:
            STATE["refused_validation"] += 1
            STATE["validation_errors"].extend(errors[:20])
            return self.reply(400, outcome("invalid", "; ".join(errors[:5]), "Bundle"))
        # Atomic: a failed entry leaves the store as it was.
        saved = ({t: list(rs) for t, rs in STORE.items()}, dict(CREATED),
                 {k: v for k, v in STATE.items() if not isinstance(v, list)})
        try:
            response = apply(bundle)
        except (Ambiguous, Unsupported) as e:
            STORE.clear()
            STORE.update(saved[0])
            CREATED.clear()
            CREATED.update(saved[1])
            STATE.update(saved[2])
            STATE["refused_unsupported"] += 1
            STATE["unsupported"].append(str(e))
            status = 412 if isinstance(e, Ambiguous) else 400
            return self.reply(status, outcome("duplicate" if status == 412 else "not-supported",
                                              str(e)))
        STATE["transactions"] += 1
        if lost:
            STATE["lost"] += 1
            return self.drop()
        self.reply(200, response)


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
host, port = server.server_address
print(f"fhir listening on {host}:{port}", flush=True)
server.serve_forever()
