"""Parses Prometheus text exposition with the Prometheus project's own Python client
(`prometheus_client.parser`, from PyPI), independently of vitalmq's exporter. Used by
tests/ops_http.rs. Needs `python3 -m pip install 'prometheus-client==0.*'`.

Reads the exposition on stdin; prints one JSON object:
  {"<family>": {"type": "counter|gauge|histogram|summary|untyped|unknown",
                "samples": [{"name": "...", "labels": {...}, "value": 1.0}, ...]}, ...}
A parse error exits non-zero with the parser's message.
"""

import json
import sys

from prometheus_client.parser import text_string_to_metric_families


def main():
    out = {}
    for family in text_string_to_metric_families(sys.stdin.read()):
        out[family.name] = {
            "type": family.type,
            "samples": [
                {"name": s.name, "labels": dict(s.labels), "value": s.value}
                for s in family.samples
            ],
        }
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
