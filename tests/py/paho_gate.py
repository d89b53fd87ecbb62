"""paho-mqtt against the vitalmq broker gate (SPEC sections 1 and 2), used by
tests/broker_e2e.rs. Needs `python3 -m pip install 'paho-mqtt==2.*'`.

    paho_gate.py --port PORT --pki DIR --version 5|311

Runs four scenarios and prints one JSON object of what it saw:

  suback        dev-00001 subscribes to [devices/dev-00001/config (QoS 1), # (QoS 0)]
                in one SUBSCRIBE: the SUBACK reason codes, in order.
  denied_pub    dev-00001 publishes QoS 1 to devices/dev-00002/telemetry (denied),
                then, if still connected, to its own telemetry topic; a bridge
                subscriber on devices/+/telemetry reports what reached it.
  retained      ops-01 publishes a retained message to devices/dev-00001/config, then
                dev-00001 subscribes: what it receives and the retain flag.
  empty_id      dev-00001 connects with an empty client id and publishes its own
                telemetry (QoS 1): the PUBACK code.
  will          dev-00001 connects with a will on devices/dev-00001/status, then its
                socket is closed without DISCONNECT: what the bridge receives.

Every wait is bounded; a scenario that times out reports what it had so far.
"""

import argparse
import json
import os
import queue
import socket
import ssl
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT = 5.0


def code_value(rc):
    """An int from a paho ReasonCode (MQTT 5 or 3.1.1) or a plain int."""
    return rc.value if hasattr(rc, "value") else int(rc)


class Client:
    """A paho client with its events queued, for step-by-step scenarios."""

    def __init__(self, args, role, ident, will=None, loop=True, client_id=None):
        self.events = queue.Queue()
        self.messages = queue.Queue()
        self.version = args.version
        proto = mqtt.MQTTv5 if args.version == "5" else mqtt.MQTTv311
        self.c = mqtt.Client(
            CallbackAPIVersion.VERSION2,
            client_id=ident if client_id is None else client_id,
            protocol=proto,
        )
        pki = args.pki
        self.c.tls_set(
            ca_certs=os.path.join(pki, "ca", "ca.pem"),
            certfile=os.path.join(pki, "identities", role, ident + ".pem"),
            keyfile=os.path.join(pki, "identities", role, ident + ".key.pem"),
        )
        if will is not None:
            self.c.will_set(will[0], will[1], qos=1)
        self.c.on_connect = lambda c, u, f, rc, p: self.events.put(
            ("connect", code_value(rc))
        )
        self.c.on_disconnect = lambda c, u, f, rc, p: self.events.put(
            ("disconnect", code_value(rc))
        )
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(
            ("suback", [code_value(r) for r in rcs])
        )
        self.c.on_publish = lambda c, u, mid, rc, p: self.events.put(
            ("puback", mid, code_value(rc))
        )
        self.c.on_message = lambda c, u, m: self.messages.put(
            (m.topic, m.payload.decode("utf-8", "replace"), bool(m.retain))
        )
        self.c.connect("127.0.0.1", args.port, keepalive=30)
        self.looping = loop
        if loop:
            self.c.loop_start()

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

    def drain(self, within=0.5):
        got = []
        while True:
            m = self.message(within)
            if m is None:
                return got
            got.append(m)

    def subscribe(self, filters):
        self.c.subscribe(filters)
        ev = self.wait("suback")
        return None if ev is None else ev[1]

    def close(self):
        try:
            self.c.disconnect()
        finally:
            if self.looping:
                self.c.loop_stop()


def connected(client):
    ev = client.wait("connect")
    return ev is not None and ev[1] == 0


def bridge(args):
    b = Client(args, "bridge", "bridge-01")
    if not connected(b):
        raise SystemExit("bridge could not connect")
    codes = b.subscribe([("devices/+/telemetry", 1), ("devices/+/status", 1)])
    if codes != [1, 1]:
        raise SystemExit(f"bridge subscription refused: {codes}")
    return b


def scenario_suback(args):
    d = Client(args, "device", "dev-00001")
    out = {"connected": connected(d)}
    out["codes"] = d.subscribe([("devices/dev-00001/config", 1), ("#", 0)])
    d.close()
    return out


def scenario_denied_pub(args):
    b = bridge(args)
    d = Client(args, "device", "dev-00001")
    out = {"connected": connected(d)}
    info = d.c.publish("devices/dev-00002/telemetry", b"forged", qos=1)
    if args.version == "5":
        ev = d.wait("puback")
        out["denied_puback"] = None if ev is None else ev[2]
    else:
        ev = d.wait("disconnect")
        out["disconnected"] = ev is not None
    out["still_connected"] = d.c.is_connected()
    if d.c.is_connected():
        d.c.publish("devices/dev-00001/telemetry", b"genuine", qos=1)
        ev = d.wait("puback")
        out["allowed_puback"] = None if ev is None else ev[2]
    else:
        # The gate closed the connection: send the allowed message on a new one, so
        # the bridge has something to wait for.
        d.close()
        d = Client(args, "device", "dev-00001")
        connected(d)
        d.c.publish("devices/dev-00001/telemetry", b"genuine", qos=1)
        ev = d.wait("puback")
        out["allowed_puback"] = None if ev is None else ev[2]
    first = b.message()
    rest = b.drain()
    out["bridge_received"] = [m[:2] for m in ([first] if first else []) + rest]
    d.close()
    b.close()
    del info
    return out


def scenario_retained(args):
    o = Client(args, "operator", "ops-01")
    out = {"ops_connected": connected(o)}
    o.c.publish("devices/dev-00001/config", b"cfg-v2", qos=1, retain=True)
    ev = o.wait("puback")
    out["ops_puback"] = None if ev is None else ev[2]
    o.close()
    d = Client(args, "device", "dev-00001")
    out["connected"] = connected(d)
    out["codes"] = d.subscribe([("devices/dev-00001/config", 1)])
    m = d.message()
    out["received"] = None if m is None else list(m)
    d.close()
    return out


def scenario_will(args):
    b = bridge(args)
    d = Client(
        args,
        "device",
        "dev-00001",
        will=("devices/dev-00001/status", b"gone"),
        loop=False,
    )
    deadline = time.monotonic() + WAIT
    while time.monotonic() < deadline and not d.c.is_connected():
        d.c.loop(timeout=0.1)
    ev = d.wait("connect", timeout=0.1)
    out = {"connected": ev is not None and ev[1] == 0}
    # Abrupt close: no DISCONNECT packet, no TLS close_notify.
    sock = d.c.socket()
    sock.shutdown(socket.SHUT_RDWR)
    sock.close()
    m = b.message()
    out["bridge_received"] = None if m is None else list(m[:2])
    b.close()
    return out


def scenario_empty_id(args):
    """An empty client id is allowed (SPEC section 1): the broker assigns the
    certificate's id, and the ACL applies to that id."""
    d = Client(args, "device", "dev-00001", client_id="")
    out = {"connected": connected(d)}
    d.c.publish("devices/dev-00001/telemetry", b"anon", qos=1)
    ev = d.wait("puback")
    out["own_puback"] = None if ev is None else ev[2]
    d.close()
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pki", required=True)
    p.add_argument("--version", choices=["5", "311"], required=True)
    args = p.parse_args()
    out = {"version": args.version}
    for name, fn in [
        ("suback", scenario_suback),
        ("denied_pub", scenario_denied_pub),
        ("retained", scenario_retained),
        ("will", scenario_will),
        ("empty_id", scenario_empty_id),
    ]:
        try:
            out[name] = fn(args)
        except (OSError, ssl.SSLError, SystemExit) as e:
            out[name] = {"error": f"{type(e).__name__}: {e}"}
    print(json.dumps(out))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
