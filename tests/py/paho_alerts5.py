"""An MQTT 5 integrator receiving vitalmq alerts with paho-mqtt, as a stock client would
(issue 18, the alert path). Used by tests/bridge_alerts_mqtt5.rs.
Needs `python3 -m pip install 'paho-mqtt==2.*'`.

    paho_alerts5.py --port PORT --pki DIR --id int-site-01 [--role integrator] \
        --clean-start 1|0 [--session-expiry SECONDS] \
        [--subscribe FILTER --qos Q] [--until suback|never|FIELD=VALUE] [--within S]

Connects with Clean Start and Session Expiry Interval (CONNECT property) as given,
subscribes if asked, and prints one JSON object a line, flushed as it happens:

    {"event": "connack", "rc": 0, "session_present": 1}
    {"event": "suback", "reasons": [1]}
    {"event": "message", "topic": ..., "qos": 1, "retain": false, "dup": false,
     "expiry": 3597 or null, "content_type": ... or null, "payload_format": 1 or null,
     "payload": {...}}
    {"event": "done"} or {"event": "timeout"}

--until: `suback` disconnects (normally, reason 0) once the SUBACK is in; `never` runs
until killed; `FIELD=VALUE` disconnects after the first message whose JSON payload has
FIELD equal to VALUE (e.g. state=resolved). --within bounds the whole run (default 60 s).
"""

import argparse
import json
import os
import queue
import sys
import time

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def emit(obj):
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def value(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pki", required=True)
    p.add_argument("--role", default="integrator")
    p.add_argument("--id", required=True)
    p.add_argument("--clean-start", type=int, choices=[0, 1], required=True)
    p.add_argument("--session-expiry", type=int, default=0)
    p.add_argument("--subscribe")
    p.add_argument("--qos", type=int, default=1)
    p.add_argument("--until", default="never")
    p.add_argument("--within", type=float, default=60.0)
    args = p.parse_args()
    until_field = None
    if args.until not in ("suback", "never"):
        until_field = args.until.split("=", 1)

    events = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.id, protocol=mqtt.MQTTv5)
    c.tls_set(
        ca_certs=os.path.join(args.pki, "ca", "ca.pem"),
        certfile=os.path.join(args.pki, "identities", args.role, args.id + ".pem"),
        keyfile=os.path.join(args.pki, "identities", args.role, args.id + ".key.pem"),
    )

    def on_connect(cl, ud, flags, rc, props):
        events.put(("connack", {"rc": value(rc), "session_present": int(flags.session_present)}))

    def on_subscribe(cl, ud, mid, reasons, props):
        events.put(("suback", {"reasons": [value(r) for r in reasons]}))

    def on_message(cl, ud, msg):
        props = msg.properties
        try:
            payload = json.loads(msg.payload)
        except ValueError:
            payload = msg.payload.decode("utf-8", "replace")
        events.put(
            (
                "message",
                {
                    "topic": msg.topic,
                    "qos": msg.qos,
                    "retain": bool(msg.retain),
                    "dup": bool(msg.dup),
                    "expiry": getattr(props, "MessageExpiryInterval", None),
                    "content_type": getattr(props, "ContentType", None),
                    "payload_format": getattr(props, "PayloadFormatIndicator", None),
                    "payload": payload,
                },
            )
        )

    def on_disconnect(cl, ud, flags, rc, props):
        events.put(("disconnect", {"rc": value(rc)}))

    c.on_connect = on_connect
    c.on_subscribe = on_subscribe
    c.on_message = on_message
    c.on_disconnect = on_disconnect
    props = Properties(PacketTypes.CONNECT)
    if args.session_expiry:
        props.SessionExpiryInterval = args.session_expiry
    c.connect(
        "127.0.0.1",
        args.port,
        keepalive=30,
        clean_start=bool(args.clean_start),
        properties=props,
    )
    c.loop_start()
    finished = False
    deadline = time.monotonic() + args.within
    try:
        while not finished:
            kind, body = events.get(timeout=max(0.0, deadline - time.monotonic()))
            emit(dict(event=kind, **body))
            if kind == "connack":
                if body["rc"] != 0:
                    break
                if args.subscribe:
                    c.subscribe(args.subscribe, qos=args.qos)
            elif kind == "suback":
                finished = args.until == "suback"
            elif kind == "message" and until_field is not None:
                field, want = until_field
                got = body["payload"].get(field) if isinstance(body["payload"], dict) else None
                finished = got == want
            elif kind == "disconnect":
                break
        if finished:
            emit({"event": "done"})
    except queue.Empty:
        emit({"event": "timeout"})
    # A normal DISCONNECT (reason 0, no Session Expiry property: the CONNECT's stays);
    # wait until paho sent it.
    c.disconnect()
    try:
        while events.get(timeout=5.0)[0] != "disconnect":
            pass
    except queue.Empty:
        pass
    c.loop_stop()


if __name__ == "__main__":
    main()
