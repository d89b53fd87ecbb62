#!/usr/bin/env python3
"""MQTT 3.1.1 / 5 conformance checks for issue 18, with paho-mqtt 2.x, a client nobody
here wrote. Driven by tests/mqtt311_conformance.rs and tests/mqtt5_conformance.rs, one
point per run:

    mqtt_conformance.py --port P [--pki DIR] --version 311|5 --point N [--hold S]

With --pki the broker is the vitalmq gate: every client connects over mutual TLS with
the certificate of its identity (DIR/identities/<role>/<id>.pem, as `vitalmq certs init`
makes them) and the shipped ACL (policies/examples/acl.toml) decides what it may do:
bridge-01 publishes alerts/site-01/conf/...; the integrators int-site-01 and int-site-01b
(`vitalmq certs issue --role integrator --id int-site-01b --site site-01`) subscribe
alerts/site-01/# and publish only their ack topic alerts/site-01/ack/<id>; ops-01 (an
operator) may subscribe to every site's alerts. Without --pki the broker is a plain one
(mosquitto, anonymous, no TLS) with the same client ids, to check the checks: run
against mosquitto every one passes, except those marked ACL-only (pass = null).

Prints one JSON line per check:
    {"point", "check", "clause", "version", "expected", "observed", "pass"}
and exits 0. A check waits for the event it expects (CONNACK, SUBACK, a message) with a
deadline. "Nothing else arrived" is shown with a marker: a message published after the
one that must not arrive, on the same subscription, which the broker delivers in order
(MQTT 5 4.6, 3.1.1 4.6); once the marker is in, anything before it would be too. The one
exception is Receive Maximum (point 7), where the event that must not happen is a third
delivery before any acknowledgement: there no later message can be sequenced behind it,
so the check gives the broker a quiet window (QUIET) to misbehave in.
"""

import argparse
import json
import os
import queue
import socket
import ssl
import sys
import time
import uuid

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

WAIT = 10.0
QUIET = 1.5
ARGS = None
RUN = uuid.uuid4().hex[:6]
SITE_TOPIC = "alerts/site-01/conf"
PUBLISHER = ("bridge", "bridge-01")
SUBSCRIBER = ("integrator", "int-site-01")
SUBSCRIBER2 = ("integrator", "int-site-01b")
OPERATOR = ("operator", "ops-01")
OWN_ACK = "alerts/site-01/ack/int-site-01"
MARK = b"marker"


def code_value(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def emit(point, check, clause, expected, observed, ok):
    print(json.dumps({"point": point, "check": check, "clause": clause,
                      "version": ARGS.version, "expected": expected,
                      "observed": observed, "pass": ok}, default=str))
    sys.stdout.flush()


def topic(name):
    return f"{SITE_TOPIC}/{name}-{RUN}"


def props(kind, **kv):
    p = Properties(kind)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


def connect_props(**kv):
    return props(PacketTypes.CONNECT, **kv)


def props_dict(p):
    if p is None:
        return {}
    return {k: (v.hex() if isinstance(v, (bytes, bytearray)) else v)
            for k, v in p.json().items()}


def v5():
    return ARGS.version == "5"


class Client:
    """A paho client with its events queued, for step-by-step checks."""

    def __init__(self, ident, client_id=None, keepalive=30, clean=True, cprops=None,
                 manual_ack=False):
        self.events = queue.Queue()
        self.messages = queue.Queue()
        self.ident = ident
        kw = {} if v5() else {"clean_session": clean}
        self.c = mqtt.Client(CallbackAPIVersion.VERSION2,
                             client_id=ident[1] if client_id is None else client_id,
                             protocol=mqtt.MQTTv5 if v5() else mqtt.MQTTv311,
                             manual_ack=manual_ack, **kw)
        # No automatic reconnects: a refused connection must stay refused.
        self.c.reconnect_delay_set(min_delay=3600, max_delay=3600)
        if ARGS.pki:
            role, name = ident
            base = os.path.join(ARGS.pki, "identities", role, name)
            self.c.tls_set(ca_certs=os.path.join(ARGS.pki, "ca", "ca.pem"),
                           certfile=base + ".pem", keyfile=base + ".key.pem")
        self.connack = None
        self.disconnects = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(
            ("suback", [code_value(r) for r in rcs]))
        self.c.on_publish = lambda c, u, mid, rc, p: self.events.put(
            ("puback", mid, code_value(rc)))
        self.c.on_message = lambda c, u, m: self.messages.put({
            "topic": m.topic, "payload": m.payload, "qos": m.qos,
            "retain": bool(m.retain), "mid": m.mid,
            "props": props_dict(getattr(m, "properties", None))})
        kw = {"clean_start": clean} if v5() else {}
        if v5() and cprops is not None:
            kw["properties"] = cprops
        self.c.connect(ARGS.host, ARGS.port, keepalive=keepalive, **kw)
        self.c.loop_start()
        self.wait("connect")

    def _on_connect(self, c, u, flags, rc, p):
        self.connack = {"rc": code_value(rc),
                        "session_present": bool(getattr(flags, "session_present", False)),
                        "props": props_dict(p)}
        self.events.put(("connect", code_value(rc)))

    def _on_disconnect(self, c, u, flags, rc, p):
        self.disconnects.append(code_value(rc))
        self.events.put(("disconnect", code_value(rc)))

    def ok(self):
        return self.connack is not None and self.connack["rc"] == 0

    def session_present(self):
        return None if self.connack is None else self.connack["session_present"]

    def wait(self, kind, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if ev[0] == kind:
                return ev
        return None

    def message(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def until_marker(self, marker=MARK, timeout=WAIT):
        """Every message up to the one whose payload is `marker` (excluded); None if
        the marker did not come within `timeout`."""
        got = []
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            m = self.message(left)
            if m is None:
                break
            if m["payload"] == marker:
                return got
            got.append(m)
        return None

    def take(self, n, timeout=WAIT):
        """The first `n` messages (fewer if the deadline passes first)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < n and (left := deadline - time.monotonic()) > 0:
            m = self.message(left)
            if m is None:
                break
            got.append(m)
        return got

    def quiet(self, window=QUIET):
        """Messages arriving within `window` (see the module doc: point 7 only)."""
        got = []
        deadline = time.monotonic() + window
        while (left := deadline - time.monotonic()) > 0:
            m = self.message(left)
            if m is None:
                break
            got.append(m)
        return got

    def sub(self, filters, properties=None):
        """filters: [(filter, qos or SubscribeOptions)]; the SUBACK codes or None."""
        if v5():
            self.c.subscribe(filters, properties=properties)
        else:
            self.c.subscribe(filters)
        ev = self.wait("suback")
        return None if ev is None else ev[1]

    def pub(self, t, payload, qos=1, retain=False, properties=None, wait=True):
        """Publishes; for QoS 1/2 waits for PUBACK/PUBCOMP and returns its code."""
        info = self.c.publish(t, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0 or not wait:
            return info.rc
        ev = self.wait("puback")
        return None if ev is None else ev[2]

    def close(self, session_expiry=None):
        """DISCONNECT (with a Session Expiry Interval under MQTT 5 if given), then
        waits for the connection to end."""
        if v5() and session_expiry is not None:
            self.c.disconnect(properties=props(PacketTypes.DISCONNECT,
                                               SessionExpiryInterval=session_expiry))
        else:
            self.c.disconnect()
        self.wait("disconnect", timeout=5)
        self.c.loop_stop()


def sub_ok(codes, n=1):
    return codes is not None and len(codes) == n and all(c < 0x80 for c in codes)


def opts(q, **kw):
    return SubscribeOptions(qos=q, **kw) if v5() else q


def payloads(msgs):
    return None if msgs is None else [m["payload"].decode() for m in msgs]


# --- point 1: empty client id -------------------------------------------------------


def raw_connect_311(client_id, clean):
    """A hand-made MQTT 3.1.1 CONNECT (paho refuses to send an empty id with
    CleanSession = 0); the CONNACK return code, or what happened instead."""
    cid = client_id.encode()
    body = (b"\x00\x04MQTT\x04" + bytes([0x02 if clean else 0x00]) + b"\x00\x3c"
            + len(cid).to_bytes(2, "big") + cid)
    sock = socket.create_connection((ARGS.host, ARGS.port), timeout=WAIT)
    try:
        if ARGS.pki:
            base = os.path.join(ARGS.pki, "identities", *SUBSCRIBER)
            ctx = ssl.create_default_context(cafile=os.path.join(ARGS.pki, "ca", "ca.pem"))
            ctx.check_hostname = False
            ctx.load_cert_chain(base + ".pem", base + ".key.pem")
            sock = ctx.wrap_socket(sock)
        sock.sendall(b"\x10" + bytes([len(body)]) + body)
        data = b""
        while len(data) < 4:
            chunk = sock.recv(4 - len(data))
            if not chunk:
                return {"closed_after": data.hex()}
            data += chunk
        return {"connack_rc": data[3], "session_present": data[2] & 1}
    except (OSError, ssl.SSLError) as e:
        return {"error": f"{type(e).__name__}: {e}"}
    finally:
        sock.close()


def point1():
    if not v5():
        obs = raw_connect_311("", clean=False)
        emit(1, "empty client id with CleanSession=0 is refused", "MQTT-3.1.3-8",
             "CONNACK 0x02 (identifier rejected)", obs, obs.get("connack_rc") == 2)
        obs = raw_connect_311("", clean=True)
        emit(1, "empty client id with CleanSession=1 is accepted", "MQTT-3.1.3-6/7",
             "CONNACK 0", obs, obs.get("connack_rc") == 0)
        return
    c = Client(SUBSCRIBER, client_id="", clean=False)
    assigned = (c.connack or {}).get("props", {}).get("AssignedClientIdentifier")
    emit(1, "empty client id with Clean Start=0 gets an assigned id", "MQTT-3.1.3-6 / 3.2.2.3.7",
         "CONNACK 0 with Assigned Client Identifier", c.connack, c.ok() and bool(assigned))
    c.close()


# --- point 2: keepalive 0 -----------------------------------------------------------


def point2():
    c = Client(SUBSCRIBER, keepalive=0)
    t = OWN_ACK
    obs = {"connack": c.connack}
    if c.ok():
        obs["suback"] = c.sub([(t, opts(1))])
        if ARGS.hold:
            # A manual run (--hold 100) outlasts the gate's 60 s keepalive to rumqttd.
            time.sleep(ARGS.hold)
        obs["puback"] = c.pub(t, MARK, qos=1)
        obs["round_trip"] = c.until_marker() == []
        obs["disconnects"] = c.disconnects
    emit(2, "keepalive 0 is valid: accepted and usable", "MQTT-3.1.2-10 / 3.1.2.10",
         "CONNACK 0, SUBACK, PUBACK, own message back, no disconnect", obs,
         c.ok() and sub_ok(obs.get("suback")) and obs.get("puback") == 0
         and obs.get("round_trip") is True and obs.get("disconnects") == [])
    c.close()


# --- point 3: delivered QoS ---------------------------------------------------------


def point3():
    p = Client(PUBLISHER)
    for granted in (2, 1, 0):
        t = topic(f"qos-{granted}")
        s = Client(SUBSCRIBER)
        codes = s.sub([(t, opts(granted))])
        for pq in (0, 1, 2):
            p.pub(t, f"q{pq}".encode(), qos=pq)
        got = {m["payload"].decode(): m["qos"] for m in s.take(3)}
        expected = {f"q{pq}": min(pq, granted) for pq in (0, 1, 2)}
        emit(3, f"delivered QoS is min(published, granted {granted})",
             "MQTT-3.8.4-6 (3.1.1) / 3.8.4 + 4.3 (5)", expected,
             {"suback": codes, "delivered": got}, sub_ok(codes) and got == expected)
        s.close()
    p.close()


# --- point 4: sessions --------------------------------------------------------------


def offline_round(name, first_clean, first_props, reconnect_clean, reconnect_props,
                  disconnect_expiry=None, after_disconnect=None):
    """Subscribes at QoS 1 (first connection), disconnects, has one QoS 1 message
    published, reconnects; then (re)subscribes, has a marker published and returns
    session_present and what arrived before the marker."""
    t = topic(name)
    s = Client(SUBSCRIBER, clean=first_clean, cprops=first_props)
    codes = s.sub([(t, opts(1))])
    s.close(session_expiry=disconnect_expiry)
    p = Client(PUBLISHER)
    p.pub(t, b"offline-1", qos=1)
    if after_disconnect:
        after_disconnect()
    s = Client(SUBSCRIBER, clean=reconnect_clean, cprops=reconnect_props)
    sp = s.session_present()
    codes2 = s.sub([(t, opts(1))])
    p.pub(t, MARK, qos=1)
    got = payloads(s.until_marker())
    s.close(session_expiry=0)
    p.close()
    return {"suback": [codes, codes2], "session_present": sp, "received": got}


KEPT = {"session_present": True, "received": ["offline-1"]}
GONE = {"session_present": False, "received": []}


def check_session(check, clause, expected, obs):
    ok = (obs["session_present"] is expected["session_present"]
          and obs["received"] == expected["received"])
    emit(4, check, clause, expected, obs, ok)


def point4():
    if not v5():
        obs = offline_round("sess311", False, None, False, None)
        check_session("CleanSession=0 keeps the session and queues QoS 1 offline",
                      "MQTT-3.1.2-4/5", KEPT, obs)
        obs = offline_round("sess311-clean", False, None, True, None)
        check_session("CleanSession=1 on reconnect discards the session", "MQTT-3.1.2-6",
                      GONE, obs)
        return
    sei = lambda n: connect_props(SessionExpiryInterval=n)
    obs = offline_round("sei3600", True, sei(3600), False, sei(3600))
    check_session("Clean Start=1 + Session Expiry 3600: session and queue survive a reconnect",
                  "3.1.2.4 + 3.1.2.11.2 (MQTT-3.1.2-23)", KEPT, obs)
    obs = offline_round("cs0-sei0", False, None, False, sei(3600))
    check_session("Clean Start=0, Session Expiry absent (0): the session ends at disconnect",
                  "3.1.2.11.2 (MQTT-3.1.2-23)", GONE, obs)
    obs = offline_round("cs0-sei3600-d0", False, sei(3600), False, sei(3600),
                        disconnect_expiry=0)
    check_session("Session Expiry 3600 on CONNECT, 0 on DISCONNECT: the session ends",
                  "3.14.2.2.2", GONE, obs)
    # What is checked is that time passing ends the session: let 2 s pass.
    obs = offline_round("cs0-sei1", False, sei(1), False, sei(3600),
                        after_disconnect=lambda: time.sleep(2.0))
    check_session("Session Expiry 1 s, reconnect after it passed: the session is gone",
                  "3.1.2.11.2 (MQTT-3.1.2-23)", GONE, obs)
    obs = offline_round("cs0-sei3600-cs1", False, sei(3600), True, sei(3600))
    check_session("Clean Start=1 on reconnect discards a session that had not expired",
                  "3.1.2.4 (MQTT-3.1.2-4)", GONE, obs)


# --- point 5: message expiry --------------------------------------------------------


def point5():
    p = Client(PUBLISHER)
    t = topic("expiry-online")
    s = Client(SUBSCRIBER)
    s.sub([(t, opts(1))])
    p.pub(t, b"e60", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    m = s.message()
    got = None if m is None else m["props"].get("MessageExpiryInterval")
    emit(5, "online delivery carries the Message Expiry Interval", "3.3.2.3.3 (MQTT-3.3.2-6)",
         "MessageExpiryInterval in 1..60", {"received": m is not None, "expiry": got},
         got is not None and 1 <= got <= 60)
    s.close()
    t = topic("expiry-queued")
    sei = connect_props(SessionExpiryInterval=3600)
    s = Client(SUBSCRIBER, clean=True, cprops=sei)
    s.sub([(t, opts(1))])
    s.close()
    queued = time.monotonic()
    p.pub(t, b"short", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=1))
    p.pub(t, b"long", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    # The check is that time passing expires the message: wait until it has.
    time.sleep(max(0, 3.0 - (time.monotonic() - queued)))
    s = Client(SUBSCRIBER, clean=False, cprops=sei)
    p.pub(t, MARK, qos=1)
    msgs = s.until_marker()
    got = None if msgs is None else {m["payload"].decode(): m["props"].get("MessageExpiryInterval")
                                     for m in msgs}
    emit(5, "queued for a session: the expired message is dropped, the remaining interval sent",
         "3.3.2.3.3 (MQTT-3.3.2-5, MQTT-3.3.2-6)", {"long": "<= 57 (60 minus the time queued)"},
         {"session_present": s.session_present(), "received": got},
         got is not None and list(got) == ["long"] and got["long"] is not None
         and got["long"] <= 57)
    s.close(session_expiry=0)
    p.close()


# --- point 6: subscription options --------------------------------------------------


def point6():
    # No Local: the integrator subscribes its own ack topic with No Local and publishes
    # on it; then the bridge publishes the marker on the same topic.
    s = Client(SUBSCRIBER)
    p = Client(PUBLISHER)
    codes = s.sub([(OWN_ACK, opts(1, noLocal=True))])
    s.pub(OWN_ACK, b"own", qos=1)
    p.pub(OWN_ACK, MARK, qos=1)
    got = payloads(s.until_marker())
    emit(6, "No Local: a client does not receive its own publications", "MQTT-3.8.3-3",
         {"received": []}, {"suback": codes, "received": got}, sub_ok(codes) and got == [])
    s.close()

    for rap in (True, False):
        t = topic(f"rap-{int(rap)}")
        s = Client(SUBSCRIBER)
        codes = s.sub([(t, opts(1, retainAsPublished=rap))])
        p.pub(t, b"r", qos=1, retain=True)
        m = s.message()
        obs = {"suback": codes, "retain_flag": None if m is None else m["retain"]}
        emit(6, f"Retain As Published={int(rap)} on a live retained message",
             "MQTT-3.3.1-12/13", {"retain_flag": rap}, obs, obs["retain_flag"] is rap)
        s.close()
        p.pub(t, b"", qos=1, retain=True)

    t = topic("rh")
    p.pub(t, b"kept", qos=1, retain=True)
    obs = {}
    for rh in (0, 1, 2):
        s = Client(SUBSCRIBER)
        counts = []
        for _ in range(2):  # a new subscription, then the same one again
            c = s.sub([(t, opts(1, retainHandling=rh))])
            p.pub(t, MARK, qos=1)
            got = s.until_marker()
            counts.append(None if got is None or not sub_ok(c)
                          else sum(1 for m in got if m["payload"] == b"kept"))
        obs[f"rh{rh}"] = counts
        s.close()
    exp = {"rh0": [1, 1], "rh1": [1, 0], "rh2": [0, 0]}
    emit(6, "Retain Handling 0/1/2: retained messages sent on [new, existing] subscription",
         "3.8.3.1 (MQTT-3.3.1-9/10/11)", exp, obs, obs == exp)
    p.pub(t, b"", qos=1, retain=True)

    t = topic("subid")
    s = Client(SUBSCRIBER)
    codes = s.sub([(t, opts(1))], properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    p.pub(t, b"sid", qos=1)
    m = s.message()
    got = None if m is None else m["props"].get("SubscriptionIdentifier")
    emit(6, "Subscription Identifier returned on delivery", "3.8.2.1.2 (MQTT-3.3.4-3)",
         {"SubscriptionIdentifier": [7]}, {"suback": codes, "SubscriptionIdentifier": got},
         got == [7])
    s.close()
    p.close()


# --- point 7: client limits ---------------------------------------------------------


def point7():
    p = Client(PUBLISHER)
    t = topic("maxpkt")
    s = Client(SUBSCRIBER, cprops=connect_props(MaximumPacketSize=256))
    codes = s.sub([(t, opts(1))])
    p.pub(t, b"x" * 1000, qos=1)
    p.pub(t, b"small", qos=1)
    p.pub(t, b"y" * 1000, qos=0)
    p.pub(t, MARK, qos=1)
    got = s.until_marker()
    obs = {"suback": codes, "received": None if got is None else
           [(len(m["payload"]), m["payload"][:8].decode()) for m in got],
           "disconnects": s.disconnects}
    emit(7, "client Maximum Packet Size 256: larger PUBLISHes (QoS 1 and 0) are not sent, "
         "later ones are", "3.1.2.11.4 (MQTT-3.1.2-24/25)",
         {"received": [[5, "small"]], "disconnects": []}, obs,
         got is not None and obs["received"] == [(5, "small")] and not s.disconnects)
    s.close()

    t = topic("recvmax")
    s = Client(SUBSCRIBER, manual_ack=True, cprops=connect_props(ReceiveMaximum=2))
    codes = s.sub([(t, opts(1))])
    for i in range(6):
        p.pub(t, f"m{i}".encode(), qos=1)
    held = s.take(2)
    held += s.quiet()
    in_flight = len(held)
    delivered = list(held)
    for m in delivered:  # grows as each acknowledgement frees a slot
        s.c.ack(m["mid"], 1)
        if len(delivered) < 6:
            delivered += s.take(1)
    acked = payloads(delivered)
    obs = {"suback": codes, "unacked_deliveries_before_acking": in_flight,
           "delivered_in_order": acked}
    emit(7, "client Receive Maximum 2: at most 2 unacknowledged QoS 1 deliveries in flight",
         "3.1.2.11.3 + 4.9 (MQTT-3.3.4-9)",
         {"unacked_deliveries_before_acking": 2, "delivered_in_order": [f"m{i}" for i in range(6)]},
         obs, in_flight == 2 and acked == [f"m{i}" for i in range(6)])
    s.close()
    p.close()


# --- point 8: CONNACK properties ----------------------------------------------------


def publish_size(t, payload_len):
    """The size of a QoS 1 MQTT 5 PUBLISH with no properties."""
    rest = 2 + len(t.encode()) + 2 + 1 + payload_len
    varint = 1 if rest < 128 else 2 if rest < 16384 else 3
    return 1 + varint + rest


def point8():
    s = Client(SUBSCRIBER)
    cp = (s.connack or {}).get("props", {})
    wanted = ("ReceiveMaximum", "MaximumPacketSize", "TopicAliasMaximum")
    emit(8, "CONNACK announces the limits enforced", "3.2.2.3 (3.2.2.3.3/.6/.8)",
         {k: "present" for k in wanted}, cp, all(k in cp for k in wanted))
    # Every availability flag absent or 1 means: available. Each is then used.
    avail = {k: cp.get(k, 2 if k == "MaximumQoS" else 1) for k in ("MaximumQoS", "RetainAvailable",
                                       "WildcardSubscriptionAvailable",
                                       "SubscriptionIdentifierAvailable",
                                       "SharedSubscriptionAvailable")}
    emit(8, "availability as announced (absent = available); points 3, 6, 10 use them",
         "3.2.2.3.4/5/11/12/13", {"MaximumQoS": 2, "RetainAvailable": 1,
                                  "WildcardSubscriptionAvailable": 1,
                                  "SubscriptionIdentifierAvailable": 1,
                                  "SharedSubscriptionAvailable": 1}, avail,
         avail == {"MaximumQoS": 2, "RetainAvailable": 1, "WildcardSubscriptionAvailable": 1,
                   "SubscriptionIdentifierAvailable": 1, "SharedSubscriptionAvailable": 1})
    # Maximum Packet Size: a PUBLISH of exactly the announced size is accepted and
    # delivered; one byte more ends the connection with 0x95.
    limit = cp.get("MaximumPacketSize")
    if limit is not None and limit < 1_000_000:
        op = Client(OPERATOR)
        codes = op.sub([(OWN_ACK, opts(1))])
        fits = limit - publish_size(OWN_ACK, 0)
        while publish_size(OWN_ACK, fits) > limit:  # the length field grew
            fits -= 1
        rc = s.pub(OWN_ACK, b"y" * fits, qos=1)
        s.pub(OWN_ACK, MARK, qos=1)
        got = op.until_marker()
        big = Client(SUBSCRIBER2)
        # One byte over (its own ack topic is one byte longer).
        assert publish_size(OWN_ACK + "b", fits) == limit + 1
        big.c.publish(OWN_ACK + "b", b"z" * fits, qos=1)
        ev = big.wait("disconnect")
        obs = {"announced": limit, "suback": codes, "at_limit_puback": rc,
               "delivered_sizes": None if got is None else [len(m["payload"]) for m in got],
               "over_limit_disconnect": None if ev is None else ev[1]}
        emit(8, "Maximum Packet Size announced is what is enforced (at the limit accepted, "
             "one byte over: DISCONNECT 0x95)", "3.2.2.3.6 (MQTT-3.2.2-15) + 4.13",
             {"at_limit_puback": 0, "delivered_sizes": [fits], "over_limit_disconnect": 0x95},
             obs, rc == 0 and obs["delivered_sizes"] == [fits]
             and obs["over_limit_disconnect"] == 0x95)
        big.c.loop_stop()
        op.close()
    else:
        emit(8, "Maximum Packet Size announced is what is enforced (at the limit accepted, "
             "one byte over: DISCONNECT 0x95)", "3.2.2.3.6 (MQTT-3.2.2-15) + 4.13",
             "a limit is announced", {"announced": limit}, False)
    # Topic Alias Maximum: announced aliases work.
    tam = cp.get("TopicAliasMaximum", 0)
    p = Client(PUBLISHER)
    t = topic("alias")
    s.sub([(t, opts(1))])
    p.pub(t, b"a1", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=max(tam, 1)))
    p.pub("", b"a2", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=max(tam, 1)))
    got = [(m["topic"], m["payload"].decode()) for m in s.take(2)]
    emit(8, "Topic Alias Maximum announced: the highest alias is usable", "3.2.2.3.8 + 3.3.2.3.4",
         [[t, "a1"], [t, "a2"]], {"announced": tam, "received": got},
         tam > 0 and got == [(t, "a1"), (t, "a2")])
    s.close()
    p.close()


# --- point 9: properties pass through, request/response -----------------------------


def point9():
    t = topic("props")
    s = Client(SUBSCRIBER)
    s.sub([(t, opts(1))])
    p = Client(PUBLISHER)
    sent = {"UserProperty": [["k", "v1"], ["k", "v2"], ["z", "ü"]],
            "PayloadFormatIndicator": 1, "ContentType": "application/json",
            "ResponseTopic": OWN_ACK, "CorrelationData": "c0ffee"}
    p.pub(t, b'{"a":1}', qos=1, properties=props(
        PacketTypes.PUBLISH, UserProperty=[("k", "v1"), ("k", "v2"), ("z", "ü")],
        PayloadFormatIndicator=1, ContentType="application/json",
        ResponseTopic=OWN_ACK, CorrelationData=bytes.fromhex("c0ffee")))
    m = s.message()
    got = None if m is None else m["props"]
    if got is not None and "UserProperty" in got:
        got["UserProperty"] = [list(x) for x in got["UserProperty"]]
    emit(9, "User Property, Payload Format Indicator, Content Type, Response Topic and "
         "Correlation Data pass through unchanged", "3.3.2.3.2/5/7/9 (MQTT-3.3.2-16..18)",
         sent, got, got is not None and all(got.get(k) == v for k, v in sent.items()))
    # Request/response within the ACL: the bridge listens on alerts/+/ack/+; the
    # integrator answers on the Response Topic with the Correlation Data.
    codes = p.sub([("alerts/+/ack/+", opts(1))])
    if got is not None and got.get("ResponseTopic"):
        s.pub(got["ResponseTopic"], b"ack", qos=1, properties=props(
            PacketTypes.PUBLISH, CorrelationData=bytes.fromhex(got.get("CorrelationData", ""))))
    r = p.message()
    obs = {"suback": codes, "response": None if r is None else
           {"topic": r["topic"], "CorrelationData": r["props"].get("CorrelationData")}}
    emit(9, "request/response through Response Topic and Correlation Data", "4.10",
         {"topic": OWN_ACK, "CorrelationData": "c0ffee"}, obs,
         obs["response"] == {"topic": OWN_ACK, "CorrelationData": "c0ffee"})
    s.close()
    p.close()


# --- point 10: shared subscriptions -------------------------------------------------


def point10():
    t = topic("share")
    group = f"$share/g{RUN}/{t}"
    a = Client(SUBSCRIBER)
    b = Client(SUBSCRIBER2)
    ca, cb = a.sub([(group, opts(1))]), b.sub([(group, opts(1))])
    p = Client(PUBLISHER)
    n = 10
    for i in range(n):
        p.pub(t, f"s{i}".encode(), qos=1)
    ga, gb = [], []
    deadline = time.monotonic() + WAIT
    while len(set(ga + gb)) < n and time.monotonic() < deadline:
        ga += payloads(a.take(1, timeout=0.05))
        gb += payloads(b.take(1, timeout=0.05))
    allm = ga + gb
    obs = {"suback": [ca, cb], "a": len(ga), "b": len(gb), "distinct": len(set(allm)),
           "total": len(allm)}
    emit(10, "shared subscription: each message to one member, spread over the group",
         "4.8.2 (5) / $share as in 4.8.2 (3.1.1)", {"total": n, "distinct": n,
                                                      "both_receive": True}, obs,
         sub_ok(ca) and sub_ok(cb) and len(allm) == n and len(set(allm)) == n
         and ga != [] and gb != [])
    codes = a.sub([(f"$share/g{RUN}/alerts/site-02/#", opts(1))])
    emit(10, "the ACL applies to the filter under $share (another site's alerts refused)",
         "4.8.2 + SPEC 2", "SUBACK failure (0x80 / 0x87)", codes,
         (codes is not None and all(c >= 0x80 for c in codes)) if ARGS.pki else None)
    a.close()
    b.close()
    p.close()


POINTS = {1: point1, 2: point2, 3: point3, 4: point4, 5: point5, 6: point6,
          7: point7, 8: point8, 9: point9, 10: point10}
MQTT5_ONLY = {5, 6, 7, 8, 9}


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pki", default=None)
    ap.add_argument("--version", choices=["311", "5"], required=True)
    ap.add_argument("--point", type=int, choices=sorted(POINTS), action="append",
                    help="the point(s) to check; all that apply to the version if none")
    ap.add_argument("--hold", type=float, default=0.0,
                    help="point 2: seconds the keepalive-0 connection idles before use")
    ARGS = ap.parse_args()
    which = ARGS.point or [n for n in sorted(POINTS) if ARGS.version == "5" or n not in MQTT5_ONLY]
    for n in which:
        try:
            POINTS[n]()
        except Exception as e:  # a check that crashed is reported; the rest still run
            emit(n, "check error", "", "no error", f"{type(e).__name__}: {e}", False)


if __name__ == "__main__":
    main()
