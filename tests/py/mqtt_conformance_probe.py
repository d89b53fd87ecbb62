#!/usr/bin/env python3
"""MQTT 3.1.1 / 5 conformance probe for the ten points of issue 18, with paho-mqtt 2.x.

    mqtt_conformance_probe.py --port P [--host H] [--pki DIR] [--only 1,3,...]

With --pki the broker is the vitalmq gate: every client connects over mutual TLS with
the certificate of its identity (DIR/identities/<role>/<id>.pem, as `vitalmq certs init`
makes them) and the shipped ACL (policies/examples/acl.toml) decides what it may do.
Identities used: bridge-01 publishes alerts/site-01/probe/... (bridge-alerts), the
integrators int-site-01 and int-site-01b (the latter made with `vitalmq certs issue
--role integrator --id int-site-01b --site site-01`) subscribe alerts/site-01/# and
publish their ack topic alerts/site-01/ack/<id>.
Without --pki the broker is a plain one (mosquitto, anonymous, no TLS) with the same
client ids, for comparison; ACL-only checks are then reported with pass = null.

Prints one JSON line per check:
    {"point", "check", "clause", "version", "expected", "observed", "pass"}
pass is true / false, or null when the check does not apply to this broker.
Every wait is bounded.
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

WAIT = 4.0
ARGS = None
RUN = uuid.uuid4().hex[:6]
SITE_TOPIC = "alerts/site-01/probe"
PUBLISHER = ("bridge", "bridge-01")
SUBSCRIBER = ("integrator", "int-site-01")
SUBSCRIBER2 = ("integrator", "int-site-01b")


def code_value(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def emit(point, check, clause, version, expected, observed, ok):
    print(
        json.dumps(
            {
                "point": point,
                "check": check,
                "clause": clause,
                "version": version,
                "expected": expected,
                "observed": observed,
                "pass": ok,
            },
            default=str,
        )
    )
    sys.stdout.flush()


def topic(name):
    return f"{SITE_TOPIC}/{name}-{RUN}"


def props(kind, **kv):
    p = Properties(kind)
    for k, v in kv.items():
        setattr(p, k, v)
    return p


def props_dict(p):
    if p is None:
        return {}
    d = p.json()
    out = {}
    for k, v in d.items():
        if isinstance(v, (bytes, bytearray)):
            v = v.hex()
        out[k] = v
    return out


class Client:
    """A paho client with its events queued, for step-by-step checks."""

    def __init__(
        self,
        ident,
        version,
        client_id=None,
        keepalive=30,
        clean=True,
        connect_props=None,
        manual_ack=False,
        connect=True,
    ):
        self.events = queue.Queue()
        self.messages = queue.Queue()
        self.version = version
        self.ident = ident
        proto = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
        kw = {}
        if version != "5":
            kw["clean_session"] = clean
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=ident[1] if client_id is None else client_id,
            protocol=proto,
            manual_ack=manual_ack,
            **kw,
        )
        if ARGS.pki:
            role, name = ident
            base = os.path.join(ARGS.pki, "identities", role, name)
            self.c.tls_set(
                ca_certs=os.path.join(ARGS.pki, "ca", "ca.pem"),
                certfile=base + ".pem",
                keyfile=base + ".key.pem",
            )
        self.connack = None
        self.c.on_connect = self._on_connect
        self.disconnects = []  # every DISCONNECT / connection loss, with its code
        self.c.on_disconnect = self._on_disconnect
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(
            ("suback", [code_value(r) for r in rcs])
        )
        self.c.on_publish = lambda c, u, mid, rc, p: self.events.put(
            ("puback", mid, code_value(rc))
        )
        self.c.on_message = lambda c, u, m: self.messages.put(
            {
                "topic": m.topic,
                "payload": m.payload,
                "qos": m.qos,
                "retain": bool(m.retain),
                "mid": m.mid,
                "props": props_dict(getattr(m, "properties", None)),
            }
        )
        self.keepalive = keepalive
        self.clean = clean
        self.connect_props = connect_props
        if connect:
            self.start()

    def _on_connect(self, c, u, flags, rc, p):
        self.connack = {
            "rc": code_value(rc),
            "session_present": bool(getattr(flags, "session_present", False)),
            "props": props_dict(p),
        }
        self.events.put(("connect", code_value(rc)))

    def _on_disconnect(self, c, u, flags, rc, p):
        self.disconnects.append(code_value(rc))
        self.events.put(("disconnect", code_value(rc), props_dict(p)))

    def start(self):
        kw = {}
        if self.version == "5":
            kw["clean_start"] = self.clean
            if self.connect_props is not None:
                kw["properties"] = self.connect_props
        self.c.connect(ARGS.host, ARGS.port, keepalive=self.keepalive, **kw)
        self.c.loop_start()
        ev = self.wait("connect")
        return ev is not None and ev[1] == 0

    def ok(self):
        return self.connack is not None and self.connack["rc"] == 0

    def wait(self, kind, timeout=WAIT):
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            try:
                ev = self.events.get(timeout=left)
            except queue.Empty:
                return None
            if ev[0] == kind:
                return ev

    def message(self, timeout=WAIT):
        try:
            return self.messages.get(timeout=timeout)
        except queue.Empty:
            return None

    def drain(self, within=1.0):
        got = []
        while True:
            m = self.message(within)
            if m is None:
                return got
            got.append(m)

    def sub(self, filters, properties=None):
        """filters: [(filter, qos or SubscribeOptions)]; returns SUBACK codes or None."""
        if self.version == "5":
            self.c.subscribe(filters, properties=properties)
        else:
            self.c.subscribe(filters)
        ev = self.wait("suback")
        return None if ev is None else ev[1]

    def pub(self, t, payload, qos=1, retain=False, properties=None, wait=True):
        info = self.c.publish(t, payload, qos=qos, retain=retain, properties=properties)
        if qos == 0 or not wait:
            return info.rc
        ev = self.wait("puback")
        return None if ev is None else ev[2]

    def close(self, properties=None):
        try:
            if self.version == "5" and properties is not None:
                self.c.disconnect(properties=properties)
            else:
                self.c.disconnect()
            time.sleep(0.2)
        finally:
            self.c.loop_stop()


def sub_ok(codes, n=1):
    return codes is not None and len(codes) == n and all(c < 0x80 for c in codes)


def qos_opt(q, **kw):
    return SubscribeOptions(qos=q, **kw)


# --- point 1 ------------------------------------------------------------------------


def raw_connect_311(client_id, clean):
    """A hand-made MQTT 3.1.1 CONNECT (paho refuses to send an empty id with
    CleanSession = 0); returns the CONNACK return code or a description."""
    cid = client_id.encode()
    flags = 0x02 if clean else 0x00
    var = b"\x00\x04MQTT\x04" + bytes([flags]) + b"\x00\x3c"
    payload = len(cid).to_bytes(2, "big") + cid
    body = var + payload
    pkt = b"\x10" + bytes([len(body)]) + body
    sock = socket.create_connection((ARGS.host, ARGS.port), timeout=WAIT)
    try:
        if ARGS.pki:
            role, name = SUBSCRIBER
            base = os.path.join(ARGS.pki, "identities", role, name)
            ctx = ssl.create_default_context(cafile=os.path.join(ARGS.pki, "ca", "ca.pem"))
            ctx.check_hostname = False
            ctx.load_cert_chain(base + ".pem", base + ".key.pem")
            sock = ctx.wrap_socket(sock)
        sock.sendall(pkt)
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
    obs = raw_connect_311("", clean=False)
    emit(1, "empty id, CleanSession=0", "MQTT-3.1.3-8", "3.1.1",
         "CONNACK 0x02 (identifier rejected)", obs, obs.get("connack_rc") == 2)
    c = Client(SUBSCRIBER, "5", client_id="", clean=False,
               connect_props=props(PacketTypes.CONNECT, SessionExpiryInterval=0))
    obs = c.connack
    assigned = (obs or {}).get("props", {}).get("AssignedClientIdentifier")
    emit(1, "empty id, Clean Start=0", "MQTT-3.1.3-6/3.2.2.3.7", "5",
         "CONNACK 0 with Assigned Client Identifier", obs,
         obs is not None and obs["rc"] == 0 and bool(assigned))
    c.close()


# --- point 2 ------------------------------------------------------------------------


def point2():
    for v in ("311", "5"):
        c = Client(SUBSCRIBER, v, keepalive=0)
        obs = {"connack": c.connack}
        if c.ok():
            time.sleep(ARGS.hold)
            obs["connected_after_hold"] = c.c.is_connected()
            obs["puback"] = c.pub("alerts/site-01/ack/int-site-01", b"ka0", qos=1) \
                if c.c.is_connected() else None
        obs["hold_s"] = ARGS.hold
        emit(2, "keepalive 0 accepted and usable", "MQTT-3.1.2-10 / 3.1.2.10", v,
             "CONNACK 0, still connected after the hold, PUBACK < 0x80",
             obs, c.ok() and obs.get("connected_after_hold") is True
             and obs.get("puback") is not None and obs["puback"] < 0x80)
        c.close()


# --- point 3 ------------------------------------------------------------------------


def point3():
    for v in ("311", "5"):
        p = Client(PUBLISHER, v)
        for granted in (2, 0):
            t = topic(f"qos{v}-{granted}")
            s = Client(SUBSCRIBER, v)
            codes = s.sub([(t, granted)])
            seen = {}
            for pq in (0, 1, 2):
                p.pub(t, f"q{pq}".encode(), qos=pq)
            for m in s.drain(1.5):
                seen[m["payload"].decode()] = m["qos"]
            expected = {f"q{pq}": min(pq, granted) for pq in (0, 1, 2)}
            emit(3, f"delivered QoS with granted {granted}", "MQTT-3.8.4-6 / 3.8.4", v,
                 expected, {"suback": codes, "delivered": seen}, seen == expected)
            s.close()
        p.close()


# --- point 4 ------------------------------------------------------------------------


def offline_round(version, t, first_props, reconnect_clean, reconnect_props,
                  disconnect_props=None, pause=0.5, first_clean=True):
    """Subscribes (QoS 1) with a session, disconnects, has one QoS 1 message published,
    reconnects; returns (session_present, [payloads])."""
    s = Client(SUBSCRIBER, version, clean=first_clean if version == "5" else False,
               connect_props=first_props)
    if version != "5":
        # a clean start first for 3.1.1: connect clean, then persistent
        s.close()
        s = Client(SUBSCRIBER, version, clean=False)
    codes = s.sub([(t, 1)])
    s.close(properties=disconnect_props)
    p = Client(PUBLISHER, version)
    p.pub(t, b"offline-1", qos=1)
    p.close()
    time.sleep(pause)
    s = Client(SUBSCRIBER, version, clean=reconnect_clean, connect_props=reconnect_props)
    got = [m["payload"].decode() for m in s.drain(1.5)]
    sp = s.connack["session_present"] if s.connack else None
    s.close(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0)
            if version == "5" else None)
    return {"suback": codes, "session_present": sp, "received": got}


def point4():
    obs = offline_round("311", topic("sess311"), None, False, None)
    emit(4, "3.1.1 persistent session queues offline QoS 1", "MQTT-3.1.2-4/5", "311",
         {"session_present": True, "received": ["offline-1"]}, obs,
         obs["session_present"] is True and obs["received"] == ["offline-1"])
    ce = lambda n: props(PacketTypes.CONNECT, SessionExpiryInterval=n)
    obs = offline_round("5", topic("sess5"), ce(3600), False, ce(3600))
    emit(4, "SEI 3600 on CONNECT: session + queue survive reconnect", "3.1.2.11.2 / MQTT-3.1.2-23", "5",
         {"session_present": True, "received": ["offline-1"]}, obs,
         obs["session_present"] is True and obs["received"] == ["offline-1"])
    obs = offline_round("5", topic("sess5-0"), ce(0) if False else None, False, ce(3600))
    emit(4, "SEI absent (0): session ends at disconnect", "3.1.2.11.2 / MQTT-3.1.2-23", "5",
         {"session_present": False, "received": []}, obs,
         obs["session_present"] is False and obs["received"] == [])
    obs = offline_round("5", topic("sess5-cs0-0"), None, False, ce(3600), first_clean=False)
    emit(4, "Clean Start=0, SEI absent (0): session still ends at disconnect",
         "3.1.2.11.2 / MQTT-3.1.2-23", "5",
         {"session_present": False, "received": []}, obs,
         obs["session_present"] is False and obs["received"] == [])
    obs = offline_round("5", topic("sess5-d0"), ce(3600), False, ce(3600),
                        disconnect_props=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))
    emit(4, "SEI 3600 on CONNECT, 0 on DISCONNECT: session ends", "3.14.2.2.2", "5",
         {"session_present": False, "received": []}, obs,
         obs["session_present"] is False and obs["received"] == [])
    obs = offline_round("5", topic("sess5-short"), ce(1), False, ce(3600), pause=3.0)
    emit(4, "SEI 1 s, reconnect after 3 s: session expired", "3.1.2.11.2", "5",
         {"session_present": False, "received": []}, obs,
         obs["session_present"] is False and obs["received"] == [])
    obs = offline_round("5", topic("sess5-cs1"), ce(3600), True, ce(3600))
    emit(4, "Clean Start=1 on reconnect discards the session", "MQTT-3.1.2-4", "5",
         {"session_present": False, "received": []}, obs,
         obs["session_present"] is False and obs["received"] == [])


# --- point 5 ------------------------------------------------------------------------


def point5():
    t = topic("expiry-online")
    s = Client(SUBSCRIBER, "5")
    s.sub([(t, 1)])
    p = Client(PUBLISHER, "5")
    p.pub(t, b"e60", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    m = s.message()
    got = None if m is None else m["props"].get("MessageExpiryInterval")
    emit(5, "online delivery carries Message Expiry Interval", "3.3.2.3.3 / MQTT-3.3.2-6", "5",
         "MessageExpiryInterval in 1..60", {"received": m is not None, "expiry": got},
         got is not None and 1 <= got <= 60)
    s.close()
    for first_clean in (True, False):
        queued_expiry(p, first_clean)
    p.close()


def queued_expiry(p, first_clean):
    t = topic(f"expiry-queued-cs{int(first_clean)}")
    ce = props(PacketTypes.CONNECT, SessionExpiryInterval=3600)
    s = Client(SUBSCRIBER, "5", clean=first_clean, connect_props=ce)
    s.sub([(t, 1)])
    s.close()
    p.pub(t, b"short", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=2))
    p.pub(t, b"long", qos=1, properties=props(PacketTypes.PUBLISH, MessageExpiryInterval=60))
    time.sleep(4.0)
    s = Client(SUBSCRIBER, "5", clean=False, connect_props=ce)
    got = {m["payload"].decode(): m["props"].get("MessageExpiryInterval") for m in s.drain(1.5)}
    emit(5, "queued (session made with Clean Start=%d, SEI 3600): expired message "
         "dropped, remaining interval sent" % int(first_clean),
         "MQTT-3.3.2-5 / MQTT-3.3.2-6", "5",
         {"long": "<= 56 (60 minus time queued)"},
         {"session_present": s.connack and s.connack["session_present"], "received": got},
         list(got) == ["long"] and got["long"] is not None and got["long"] <= 57)
    s.close(properties=props(PacketTypes.DISCONNECT, SessionExpiryInterval=0))


# --- point 6 ------------------------------------------------------------------------


def point6():
    own = "alerts/site-01/ack/int-site-01"
    s = Client(SUBSCRIBER, "5")
    codes = s.sub([(own, qos_opt(1, noLocal=True))])
    s.pub(own, b"nolocal", qos=1)
    got = [m["payload"].decode() for m in s.drain(1.5)]
    emit(6, "No Local", "MQTT-3.8.3-3", "5", {"received": []},
         {"suback": codes, "received": got}, sub_ok(codes) and got == [])
    s.close()

    p = Client(PUBLISHER, "5")
    for rap in (True, False):
        t = topic(f"rap-{int(rap)}")
        s = Client(SUBSCRIBER, "5")
        codes = s.sub([(t, qos_opt(1, retainAsPublished=rap))])
        p.pub(t, b"r", qos=1, retain=True)
        m = s.message()
        obs = {"suback": codes, "retain_flag": None if m is None else m["retain"]}
        emit(6, f"Retain As Published={int(rap)} (live message)", "MQTT-3.3.1-12/13", "5",
             {"retain_flag": rap}, obs, obs["retain_flag"] is rap)
        s.close()
        p.pub(t, b"", qos=1, retain=True)

    t = topic("rh")
    p.pub(t, b"kept", qos=1, retain=True)
    obs = {}
    for rh in (0, 1, 2):
        s = Client(SUBSCRIBER, "5")
        c1 = s.sub([(t, qos_opt(1, retainHandling=rh))])
        first = len(s.drain(1.0))
        c2 = s.sub([(t, qos_opt(1, retainHandling=rh))])
        second = len(s.drain(1.0))
        obs[f"rh{rh}"] = {"suback": [c1, c2], "retained_on_new": first,
                          "retained_on_existing": second}
        s.close()
    exp = {"rh0": (1, 1), "rh1": (1, 0), "rh2": (0, 0)}
    okrh = all((obs[k]["retained_on_new"], obs[k]["retained_on_existing"]) == v
               for k, v in exp.items())
    emit(6, "Retain Handling 0/1/2 (retained sent on new / existing subscription)",
         "MQTT-3.3.1-9/10/11", "5", {k: list(v) for k, v in exp.items()}, obs, okrh)
    p.pub(t, b"", qos=1, retain=True)

    t = topic("subid")
    s = Client(SUBSCRIBER, "5")
    codes = s.sub([(t, 1)], properties=props(PacketTypes.SUBSCRIBE, SubscriptionIdentifier=7))
    p.pub(t, b"sid", qos=1)
    m = s.message()
    got = None if m is None else m["props"].get("SubscriptionIdentifier")
    emit(6, "Subscription Identifier returned on delivery", "MQTT-3.3.4-3", "5",
         {"SubscriptionIdentifier": [7]}, {"suback": codes, "received": m is not None,
                                           "SubscriptionIdentifier": got}, got == [7])
    s.close()
    p.close()


# --- point 7 ------------------------------------------------------------------------


def point7():
    t = topic("maxpkt")
    s = Client(SUBSCRIBER, "5", connect_props=props(PacketTypes.CONNECT, MaximumPacketSize=256))
    codes = s.sub([(t, 1)])
    p = Client(PUBLISHER, "5")
    p.pub(t, b"x" * 1000, qos=1)
    p.pub(t, b"small", qos=1)
    got = [(len(m["payload"]), m["payload"][:8].decode()) for m in s.drain(1.5)]
    obs = {"suback": codes, "received": got, "disconnects": list(s.disconnects)}
    emit(7, "client Maximum Packet Size 256: 1000-byte PUBLISH not sent, later ones are",
         "MQTT-3.1.2-24/25", "5", {"received": [[5, "small"]], "disconnects": []},
         obs, got == [(5, "small")] and obs["disconnects"] == [])
    s.close()

    t = topic("recvmax")
    s = Client(SUBSCRIBER, "5", manual_ack=True,
               connect_props=props(PacketTypes.CONNECT, ReceiveMaximum=2))
    codes = s.sub([(t, 1)])
    for i in range(6):
        p.pub(t, f"m{i}".encode(), qos=1, wait=False)
    time.sleep(0.2)
    held = s.drain(1.5)
    in_flight = len(held)
    for m in held:
        s.c.ack(m["mid"], 1)
    rest = s.drain(1.5)
    for m in rest:
        s.c.ack(m["mid"], 1)
    rest += s.drain(1.0)
    obs = {"suback": codes, "unacked_deliveries_before_acking": in_flight,
           "total_after_acking": in_flight + len(rest)}
    emit(7, "client Receive Maximum 2: at most 2 unacknowledged QoS 1 in flight",
         "MQTT-3.3.4-9 / 4.9", "5", {"unacked_deliveries_before_acking": 2,
                                     "total_after_acking": 6},
         obs, in_flight <= 2 and obs["total_after_acking"] == 6)
    s.close()
    p.close()


# --- point 8 ------------------------------------------------------------------------


def point8():
    s = Client(SUBSCRIBER, "5")
    cp = (s.connack or {}).get("props", {})
    emit(8, "CONNACK properties (as announced)", "3.2.2.3", "5",
         "limits the server enforces", cp, None)
    # Maximum Packet Size: a PUBLISH larger than announced / larger than enforced.
    # The integrator's ACL limit is max_payload_bytes = 4096 (gate); announce >= that?
    announced = cp.get("MaximumPacketSize")
    big = 6000
    own = "alerts/site-01/ack/int-site-01"
    sub = Client(("operator", "ops-01"), "5") if ARGS.pki else Client(("x", "ops-01"), "5")
    codes = sub.sub([(own, 1)])
    rc = s.pub(own, b"y" * big, qos=1)
    got = [len(m["payload"]) for m in sub.drain(1.0)]
    still = s.c.is_connected()
    disc = []
    while True:
        try:
            ev = s.events.get_nowait()
        except queue.Empty:
            break
        if ev[0] in ("disconnect", "connect"):
            disc.append(list(ev[:2]))
    accepted = rc == 0 and got == [big]
    consistent = accepted if announced is None or announced >= big + 100 else True
    emit(8, f"Maximum Packet Size announced vs enforced ({big}-byte PUBLISH)",
         "3.2.2.3.6 / MQTT-3.2.2-15", "5",
         "unannounced (no limit) => accepted and delivered; or announced < size",
         {"announced": announced, "puback": rc, "delivered_sizes": got,
          "connection_events": disc, "disconnects": list(s.disconnects)}, consistent)
    sub.close()
    s.close()
    # Maximum QoS: unannounced means 2.
    mq = cp.get("MaximumQoS")
    t = topic("maxqos")
    r = Client(SUBSCRIBER, "5")
    r.sub([(t, 2)])
    p = Client(PUBLISHER, "5")
    rc = p.pub(t, b"q2", qos=2)
    m = r.message()
    ok = (rc == 0 and m is not None and m["qos"] == 2) if mq is None or mq == 2 else True
    emit(8, "Maximum QoS announced vs QoS 2 round trip", "3.2.2.3.4", "5",
         "unannounced (2) => QoS 2 PUBLISH completed and delivered at QoS 2",
         {"announced": mq, "pubcomp": rc, "delivered_qos": None if m is None else m["qos"]},
         ok)
    # Topic Alias Maximum: announced > 0 => an alias must work.
    tam = cp.get("TopicAliasMaximum", 0)
    if tam:
        t = topic("alias")
        r.sub([(t, 1)])
        p.pub(t, b"a1", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
        p.pub("", b"a2", qos=1, properties=props(PacketTypes.PUBLISH, TopicAlias=1))
        got = [(m["topic"], m["payload"].decode()) for m in r.drain(1.5)]
        emit(8, "Topic Alias Maximum announced: alias usable", "3.3.2.3.4", "5",
             [[t, "a1"], [t, "a2"]], {"announced": tam, "received": got,
                                      "publisher_connected": p.c.is_connected()},
             got == [(t, "a1"), (t, "a2")])
    else:
        emit(8, "Topic Alias Maximum announced: alias usable", "3.3.2.3.4", "5",
             "0 announced: client must not use aliases", {"announced": 0}, True)
    # Retain / wildcard / subscription id / shared availability vs behaviour.
    avail = {k: cp.get(k, 1) for k in ("RetainAvailable", "WildcardSubscriptionAvailable",
                                       "SubscriptionIdentifierAvailable",
                                       "SharedSubscriptionAvailable")}
    emit(8, "availability flags (absent = available): see points 6 and 10 for behaviour",
         "3.2.2.3.5/11/12/13", "5", "each announced feature works (points 6, 10)", avail, None)
    r.close()
    p.close()


# --- point 9 ------------------------------------------------------------------------


def point9():
    t = topic("props")
    s = Client(SUBSCRIBER, "5")
    s.sub([(t, 1)])
    p = Client(PUBLISHER, "5")
    sent = {
        "UserProperty": [["k", "v1"], ["k", "v2"], ["z", "ü"]],
        "PayloadFormatIndicator": 1,
        "ContentType": "application/json",
        "ResponseTopic": "alerts/site-01/ack/int-site-01",
        "CorrelationData": "c0ffee",
    }
    p.pub(t, b'{"a":1}', qos=1, properties=props(
        PacketTypes.PUBLISH,
        UserProperty=[("k", "v1"), ("k", "v2"), ("z", "ü")],
        PayloadFormatIndicator=1,
        ContentType="application/json",
        ResponseTopic="alerts/site-01/ack/int-site-01",
        CorrelationData=bytes.fromhex("c0ffee"),
    ))
    m = s.message()
    got = None if m is None else m["props"]
    if got is not None and "UserProperty" in got:
        got["UserProperty"] = [list(x) for x in got["UserProperty"]]
    ok = got is not None and all(got.get(k) == v for k, v in sent.items())
    emit(9, "User Property / PFI / Content Type / Response Topic / Correlation Data pass through",
         "MQTT-3.3.2-16/17/18, 3.3.2.3.2/9", "5", sent, got, ok)
    # request/response within the ACL: bridge listens on alerts/+/ack/+, the integrator
    # answers on the response topic with the correlation data.
    codes = p.sub([("alerts/+/ack/+", 1)])
    if m is not None and got.get("ResponseTopic"):
        s.pub(got["ResponseTopic"], b"ack", qos=1, properties=props(
            PacketTypes.PUBLISH, CorrelationData=bytes.fromhex(got.get("CorrelationData", ""))))
    r = p.message()
    obs = {"suback": codes, "response": None if r is None else
           {"topic": r["topic"], "CorrelationData": r["props"].get("CorrelationData")}}
    emit(9, "request/response via Response Topic + Correlation Data", "4.10", "5",
         {"topic": "alerts/site-01/ack/int-site-01", "CorrelationData": "c0ffee"}, obs,
         obs["response"] == {"topic": "alerts/site-01/ack/int-site-01",
                             "CorrelationData": "c0ffee"})
    s.close()
    p.close()


# --- point 10 -----------------------------------------------------------------------


def point10():
    for v in ("311", "5"):
        t = topic(f"share{v}")
        a = Client(SUBSCRIBER, v)
        b = Client(SUBSCRIBER2, v)
        ca = a.sub([(f"$share/g{RUN}/{t}", 1)])
        cb = b.sub([(f"$share/g{RUN}/{t}", 1)])
        p = Client(PUBLISHER, v)
        n = 10
        for i in range(n):
            p.pub(t, f"s{i}".encode(), qos=1)
        ga = [m["payload"].decode() for m in a.drain(1.5)]
        gb = [m["payload"].decode() for m in b.drain(0.5)]
        allm = ga + gb
        obs = {"suback": [ca, cb], "a": len(ga), "b": len(gb),
               "distinct": len(set(allm)), "total": len(allm)}
        emit(10, "shared subscription: each message once, spread over the group",
             "4.8.2", v, {"total": n, "distinct": n, "both_receive": True}, obs,
             sub_ok(ca) and sub_ok(cb) and len(allm) == n and len(set(allm)) == n
             and ga != [] and gb != [])
        # ACL on the underlying filter: site-02 alerts are not int-site-01's.
        codes = a.sub([(f"$share/g{RUN}/alerts/site-02/#", 1)])
        if ARGS.pki:
            emit(10, "ACL applies to the filter under $share (other site refused)",
                 "4.8.2 + SPEC 2", v, "SUBACK failure (0x80 / 0x87)", codes,
                 codes is not None and all(c >= 0x80 for c in codes))
        else:
            emit(10, "ACL applies to the filter under $share (other site refused)",
                 "4.8.2 + SPEC 2", v, "n/a without an ACL", codes, None)
        a.close()
        b.close()
        p.close()


POINTS = {1: point1, 2: point2, 3: point3, 4: point4, 5: point5, 6: point6,
          7: point7, 8: point8, 9: point9, 10: point10}


def main():
    global ARGS
    ap = argparse.ArgumentParser()
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--pki", default=None)
    ap.add_argument("--hold", type=float, default=3.0,
                    help="seconds a keepalive-0 connection idles before it publishes")
    ap.add_argument("--only", default=None, help="comma-separated point numbers")
    ARGS = ap.parse_args()
    which = [int(x) for x in ARGS.only.split(",")] if ARGS.only else sorted(POINTS)
    for n in which:
        try:
            POINTS[n]()
        except Exception as e:  # a check that crashed is reported, the rest still run
            emit(n, "probe error", "", "", "no error", f"{type(e).__name__}: {e}", False)
        time.sleep(0.3)


if __name__ == "__main__":
    main()
