"""Verifies webhook requests captured by the stream tests with the `standardwebhooks` package
(the Standard Webhooks reference implementation, from PyPI): an implementation of the signature
scheme independent of the service's.

Input (argv[1]): a JSON list of {"headers": {...}, "body": <base64>, "secrets": [...]}.
Output: one JSON line per request: for each secret, whether the request verifies with it.
"""

import base64
import json
import sys

from standardwebhooks.webhooks import Webhook


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as handle:
        cases = json.load(handle)
    for case in cases:
        body = base64.b64decode(case["body"])
        results = []
        for secret in case["secrets"]:
            try:
                Webhook(secret).verify(body, case["headers"])
                results.append(True)
            except Exception:  # the package raises WebhookVerificationError
                results.append(False)
        print(json.dumps(results))


if __name__ == "__main__":
    main()
