#!/usr/bin/env python3
"""Alert latency probe for scripts/bench-alerts (not a test).

Publishes pre-signed readings of one probe device (files low-N.cose / ok-N.cose made by
`vitalmq envelope sign`) and, as an integrator of the device's site subscribed to
alerts/<site>/#, times each reading from PUBLISH to the arrival of the alert it causes:
a low reading opens `probe-low`, the next normal one resolves it. Prints one JSON line.

  alert_latency.py --port P --ca CA --device-cert C --device-key K --device ID
                   --integrator-cert C --integrator-key K --integrator ID --site S
                   --dir DIR --pairs N
"""
import argparse
import json
import queue
import ssl
import statistics
import time

import paho.mqtt.client as mqtt


def client(args, cert, key, client_id):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv311)
    c.tls_set(ca_certs=args.ca, certfile=cert, keyfile=key, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    c.tls_insecure_set(False)
    return c


def main():
    p = argparse.ArgumentParser()
    for a in ["port", "ca", "device-cert", "device-key", "device", "integrator-cert",
              "integrator-key", "integrator", "site", "dir"]:
        p.add_argument("--" + a, required=True)
    p.add_argument("--pairs", type=int, default=100)
    args = p.parse_args()
    arrivals = queue.Queue()

    sub = client(args, args.integrator_cert, args.integrator_key, args.integrator)
    subscribed = queue.Queue()
    sub.on_connect = lambda c, u, f, rc, props=None: c.subscribe(f"alerts/{args.site}/#", qos=1)
    sub.on_subscribe = lambda c, u, mid, rcs, props=None: subscribed.put(True)
    sub.on_message = lambda c, u, m: arrivals.put((time.perf_counter(), json.loads(m.payload)))
    sub.connect("127.0.0.1", int(args.port))
    sub.loop_start()
    subscribed.get(timeout=20)

    pub = client(args, args.device_cert, args.device_key, args.device)
    pub.connect("127.0.0.1", int(args.port))
    pub.loop_start()
    time.sleep(0.5)

    latencies = {"open": [], "resolved": []}
    missed = 0
    for i in range(args.pairs):
        for kind, state in (("low", "open"), ("ok", "resolved")):
            with open(f"{args.dir}/{kind}-{i}.cose", "rb") as f:
                body = f.read()
            t0 = time.perf_counter()
            pub.publish(f"devices/{args.device}/telemetry", body, qos=1)
            deadline = t0 + 5
            while True:
                try:
                    t1, alert = arrivals.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    missed += 1
                    break
                if alert.get("rule") == "probe-low" and alert.get("state") == state:
                    latencies[state].append((t1 - t0) * 1000.0)
                    break
            time.sleep(0.02)
    everything = sorted(latencies["open"] + latencies["resolved"])

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    print(json.dumps({
        "alerts_timed": len(everything),
        "missed": missed,
        "p50_ms": pct(everything, 0.50),
        "p99_ms": pct(everything, 0.99),
        "max_ms": round(max(everything), 3) if everything else None,
        "mean_ms": round(statistics.mean(everything), 3) if everything else None,
    }))


if __name__ == "__main__":
    main()
