"""Acknowledges a vitalmq alert with paho-mqtt (SPEC section 5.2), as an integrator or
operator would: one QoS 1 PUBLISH of {"alert_id": ..., "note": ...} to
alerts/{site}/ack/{id}, over MQTT 5 so that a refusal by the broker's ACL comes back
as a PUBACK reason code instead of a closed connection. Used by tests/bridge_alerts_v11.rs.
Needs `python3 -m pip install 'paho-mqtt==2.*'`.

    paho_ack.py --port PORT --pki DIR --role integrator --id int-site-01 \
        --topic alerts/site-01/ack/int-site-01 --alert-id al-... [--note TEXT]

Prints one JSON object: {"connected": rc, "puback": reason code or null}.
"""

import argparse
import json
import os
import queue

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT = 10.0


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pki", required=True)
    p.add_argument("--role", required=True)
    p.add_argument("--id", required=True)
    p.add_argument("--topic", required=True)
    p.add_argument("--alert-id", required=True)
    p.add_argument("--note")
    args = p.parse_args()

    events = queue.Queue()
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.id, protocol=mqtt.MQTTv5)
    c.tls_set(
        ca_certs=os.path.join(args.pki, "ca", "ca.pem"),
        certfile=os.path.join(args.pki, "identities", args.role, args.id + ".pem"),
        keyfile=os.path.join(args.pki, "identities", args.role, args.id + ".key.pem"),
    )
    value = lambda rc: rc.value if hasattr(rc, "value") else int(rc)
    c.on_connect = lambda cl, ud, fl, rc, pr: events.put(("connect", value(rc)))
    c.on_publish = lambda cl, ud, mid, rc, pr: events.put(("puback", value(rc)))
    c.connect("127.0.0.1", args.port, keepalive=30)
    c.loop_start()
    out = {"connected": None, "puback": None}
    try:
        kind, code = events.get(timeout=WAIT)
        out["connected"] = code
        if kind == "connect" and code == 0:
            body = {"alert_id": args.alert_id}
            if args.note is not None:
                body["note"] = args.note
            c.publish(args.topic, json.dumps(body), qos=1)
            kind, code = events.get(timeout=WAIT)
            if kind == "puback":
                out["puback"] = code
    except queue.Empty:
        pass
    c.disconnect()
    c.loop_stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
