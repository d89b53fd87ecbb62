#!/usr/bin/env python3
"""Alert latency probe for scripts/bench-alerts (not a test).

Publishes pre-signed readings of one probe device (files low-N.cose / ok-N.cose made by
`vitalmq envelope sign`) and, as an integrator of the device's site subscribed to
alerts/<site>/#, times each reading from PUBLISH to the arrival of the alert it causes:
a low reading opens `probe-low`, the next normal one resolves it. Prints one JSON line.

With --silence-after N (the policy's `[silence] after_s`), the probe device then stops
and the integrator waits for the `no-data` alert it causes: the delay is timed from the
bridge's reception of the device's last message (the alert's `last_seen_at`, same host
clock) to the alert's arrival, and split into detection (`raised_at`) and delivery.

  alert_latency.py --port P --ca CA --device-cert C --device-key K --device ID
                   --integrator-cert C --integrator-key K --integrator ID --site S
                   --dir DIR --pairs N [--first F] [--silence-after N]

--first F takes the files from index F on (a second scenario signs fresh sequence
numbers after the first one's).
"""
import argparse
import datetime
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
    p.add_argument("--first", type=int, default=0)
    p.add_argument("--silence-after", type=float, default=None)
    args = p.parse_args()
    arrivals = queue.Queue()

    sub = client(args, args.integrator_cert, args.integrator_key, args.integrator)
    subscribed = queue.Queue()
    sub.on_connect = lambda c, u, f, rc, props=None: c.subscribe(f"alerts/{args.site}/#", qos=1)
    sub.on_subscribe = lambda c, u, mid, rcs, props=None: subscribed.put(True)
    sub.on_message = lambda c, u, m: arrivals.put((time.perf_counter(), time.time(), json.loads(m.payload)))
    sub.connect("127.0.0.1", int(args.port))
    sub.loop_start()
    subscribed.get(timeout=20)

    pub = client(args, args.device_cert, args.device_key, args.device)
    pub.connect("127.0.0.1", int(args.port))
    pub.loop_start()
    time.sleep(0.5)

    latencies = {"open": [], "resolved": []}
    timed = []  # (ms, wall time of the publish, state): the slowest are reported
    missed = 0
    last_publish_wall = None
    for i in range(args.first, args.first + args.pairs):
        for kind, state in (("low", "open"), ("ok", "resolved")):
            with open(f"{args.dir}/{kind}-{i}.cose", "rb") as f:
                body = f.read()
            t0 = time.perf_counter()
            last_publish_wall = wall_t0 = time.time()
            pub.publish(f"devices/{args.device}/telemetry", body, qos=1)
            deadline = t0 + 5
            while True:
                try:
                    t1, _, alert = arrivals.get(timeout=max(0.0, deadline - time.perf_counter()))
                except queue.Empty:
                    missed += 1
                    break
                if alert.get("rule") == "probe-low" and alert.get("state") == state:
                    latencies[state].append((t1 - t0) * 1000.0)
                    timed.append(((t1 - t0) * 1000.0, wall_t0, state))
                    break
            time.sleep(0.02)
    everything = sorted(latencies["open"] + latencies["resolved"])

    def pct(xs, q):
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 3) if xs else None

    report = {
        "alerts_timed": len(everything),
        "missed": missed,
        "p50_ms": pct(everything, 0.50),
        "p99_ms": pct(everything, 0.99),
        "max_ms": round(max(everything), 3) if everything else None,
        "mean_ms": round(statistics.mean(everything), 3) if everything else None,
        # to find the slowest in the logs: publish time (UTC), state, latency
        "slowest": [{"published_at": datetime.datetime.fromtimestamp(w, datetime.timezone.utc)
                     .isoformat(timespec="milliseconds"), "state": st, "ms": round(ms, 3)}
                    for ms, w, st in sorted(timed, reverse=True)[:5]],
    }
    if args.silence_after is not None:
        report["silence"] = silence(args, arrivals, last_publish_wall)
    print(json.dumps(report))


def wall(rfc3339):
    """Seconds since the epoch of an RFC 3339 time (the bridge writes `...Z`)."""
    return datetime.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def silence(args, arrivals, last_publish_wall):
    """Waits for the probe device's `no-data` alert after its last publish."""
    deadline = time.time() + args.silence_after + 20
    while True:
        try:
            _, arrived, alert = arrivals.get(timeout=max(0.0, deadline - time.time()))
        except queue.Empty:
            return {"after_s": args.silence_after, "missed": True}
        if (alert.get("rule") == "no-data" and alert.get("device") == args.device
                and alert.get("state") == "open" and arrived > last_publish_wall
                and alert.get("last_seen_at")):
            break
    seen, raised = wall(alert["last_seen_at"]), wall(alert["raised_at"])
    ms = lambda s: round(s * 1000.0, 1)  # noqa: E731
    return {
        "after_s": args.silence_after,
        "silence_after_s": alert.get("silence_after_s"),
        "reason": alert.get("reason"),
        "last_seen_at": alert["last_seen_at"],
        "raised_at": alert["raised_at"],
        # last accepted message (bridge reception) -> alert at the integrator
        "delay_ms": ms(arrived - seen),
        "detect_ms": ms(raised - seen),
        "deliver_ms": ms(arrived - raised),
        "excess_over_after_ms": ms(arrived - seen - args.silence_after),
        "from_last_publish_ms": ms(arrived - last_publish_wall),
    }


if __name__ == "__main__":
    main()
