#!/usr/bin/env python3
"""A raw MQTT client over mutual TLS, for packets a stock client will not send.

    raw_mqtt.py --port P --ca CA --cert CERT --key KEY < STEPS

STEPS (on stdin) is a JSON list, carried out in order:
    {"send": "<hex of one or more packets>"}
    {"recv": n}        read n whole packets (each within the deadline)
    {"eof": true}      read until the server closes (within the deadline)
Prints one JSON object: {"packets": [hex, ...], "closed": bool, "error": str or null}.
A step that cannot complete (the server closed, the deadline passed) ends the run with
"error" set; what arrived until then is still reported. Only the standard library.
"""

import argparse
import json
import socket
import ssl
import sys

DEADLINE_S = 10.0


def read_exact(sock, n):
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def read_packet(sock):
    first = read_exact(sock, 1)
    length, shift, header = 0, 0, first
    while True:
        b = read_exact(sock, 1)
        header += b
        length |= (b[0] & 0x7F) << shift
        shift += 7
        if not b[0] & 0x80:
            break
        if shift > 21:
            raise ValueError("bad remaining length from the server")
    return header + read_exact(sock, length)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--ca", required=True)
    ap.add_argument("--cert", required=True)
    ap.add_argument("--key", required=True)
    args = ap.parse_args()
    steps = json.load(sys.stdin)
    ctx = ssl.create_default_context(cafile=args.ca)
    ctx.load_cert_chain(args.cert, args.key)
    result = {"packets": [], "closed": False, "error": None}
    try:
        raw = socket.create_connection(("127.0.0.1", args.port), timeout=DEADLINE_S)
        sock = ctx.wrap_socket(raw, server_hostname="localhost")
    except (OSError, ssl.SSLError) as e:
        result["error"] = "connect or TLS handshake failed: %r" % e
        json.dump(result, sys.stdout)
        print()
        return
    sock.settimeout(DEADLINE_S)
    step = {}
    try:
        for step in steps:
            if "send" in step:
                sock.sendall(bytes.fromhex(step["send"]))
            elif "recv" in step:
                for _ in range(step["recv"]):
                    result["packets"].append(read_packet(sock).hex())
            elif "eof" in step:
                while True:
                    result["packets"].append(read_packet(sock).hex())
    except (EOFError, ConnectionResetError, ssl.SSLEOFError, ssl.SSLZeroReturnError):
        result["closed"] = True
        if "eof" not in step:
            result["error"] = "closed by the server"
    except socket.timeout:
        result["error"] = "deadline passed"
    except Exception as e:  # reported, not raised: the test prints it
        result["error"] = repr(e)
    finally:
        sock.close()
    json.dump(result, sys.stdout)
    print()


if __name__ == "__main__":
    main()
