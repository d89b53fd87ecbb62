"""Verifies captured vitalmq webhook requests with the Standard Webhooks reference
library for Python (`standardwebhooks` from PyPI), independently of vitalmq's code.
Used by tests/bridge_alerts.rs. Needs `python3 -m pip install 'standardwebhooks==1.*'`.

Reads one JSON object on stdin:
  {"secrets": ["whsec_...", ...], "later_s": 600,
   "requests": [{"headers": {"name": "value", ...}, "body_b64": "..."}, ...]}

For each secret and request it verifies the request now, and again as a receiver would
if the same request were replayed `later_s` seconds after it was signed. Prints one JSON
object: {"<secret index>": {"now": [...], "later": [...]}}, each entry "ok" or the
library's error message.
"""

import base64
import json
import sys
from datetime import datetime, timedelta, timezone

from standardwebhooks import webhooks
from standardwebhooks.webhooks import Webhook, WebhookVerificationError


class _Shifted(datetime):
    """`datetime` whose now() is `shift` ahead of the real clock."""

    shift = timedelta(0)

    @classmethod
    def now(cls, tz=None):
        return datetime.now(tz=tz) + cls.shift


def verify(secret, request):
    try:
        Webhook(secret).verify(base64.b64decode(request["body_b64"]), request["headers"])
        return "ok"
    except WebhookVerificationError as e:
        return str(e)


def main():
    job = json.load(sys.stdin)
    result = {}
    for i, secret in enumerate(job["secrets"]):
        webhooks.datetime = datetime
        now = [verify(secret, r) for r in job["requests"]]
        _Shifted.shift = timedelta(seconds=job["later_s"])
        webhooks.datetime = _Shifted
        later = [verify(secret, r) for r in job["requests"]]
        webhooks.datetime = datetime
        result[str(i)] = {"now": now, "later": later}
    json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
