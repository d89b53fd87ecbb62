"""paho-mqtt with MQTT keepalive 0 against the vitalmq broker gate (issue 15, item 6),
used by tests/broker_e2e.rs. Needs `python3 -m pip install 'paho-mqtt==2.*'`.

    paho_keepalive0.py --port PORT --pki DIR --device ID --version 5|311

Connects the device with keepalive 0 ("no keepalive", valid in both versions),
publishes one QoS 1 message to its own telemetry topic and disconnects. Prints one
JSON object: the CONNACK code (null if none came) and the PUBACK code. Every wait is
bounded.
"""

import argparse
import json
import os
import queue

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

WAIT = 10.0


def code_value(rc):
    return rc.value if hasattr(rc, "value") else int(rc)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--pki", required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--version", choices=["5", "311"], required=True)
    args = p.parse_args()

    events = queue.Queue()
    proto = mqtt.MQTTv5 if args.version == "5" else mqtt.MQTTv311
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=args.device, protocol=proto)
    base = os.path.join(args.pki, "identities", "device", args.device)
    c.tls_set(
        ca_certs=os.path.join(args.pki, "ca", "ca.pem"),
        certfile=base + ".pem",
        keyfile=base + ".key.pem",
    )
    c.on_connect = lambda c_, u, f, rc, props: events.put(("connect", code_value(rc)))
    c.on_disconnect = lambda c_, u, f, rc, props: events.put(("disconnect", code_value(rc)))
    c.on_publish = lambda c_, u, mid, rc, props: events.put(("puback", code_value(rc)))
    out = {"connect": None, "puback": None}
    c.connect("127.0.0.1", args.port, keepalive=0)
    c.loop_start()
    try:
        kind, rc = events.get(timeout=WAIT)
        if kind == "connect":
            out["connect"] = rc
            c.publish("devices/%s/telemetry" % args.device, b"k0", qos=1)
            kind, rc = events.get(timeout=WAIT)
            if kind == "puback":
                out["puback"] = rc
    except queue.Empty:
        pass
    finally:
        c.disconnect()
        c.loop_stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
