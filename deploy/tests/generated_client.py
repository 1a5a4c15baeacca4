"""A Python client generated from schemas/openapi/audit-logs.openapi.json (openapi-python-client)
walks every page of an organization's log by cursor, as a user's script would. Generated clients
send every parameter's default (offset=0 among them), so this is what such clients meet.

Usage: generated_client.py BASE_URL API_KEY EXPECTED_EVENTS
"""

import json
import sys

from audit_logs_api_client import AuthenticatedClient
from audit_logs_api_client.api.default import list_audit_logs


def main() -> int:
    base_url, key, expected = sys.argv[1], sys.argv[2], int(sys.argv[3])
    client = AuthenticatedClient(base_url=base_url, token=key, prefix="", auth_header_name="X-API-Key")
    seen = []
    cursor = None
    pages = 0
    while True:
        arguments = {"limit": 37}
        if cursor is not None:
            arguments["cursor"] = cursor
        response = list_audit_logs.sync_detailed(client=client, **arguments)
        if response.status_code != 200:
            print(f"page {pages + 1}: HTTP {int(response.status_code)}: {response.content[:300]!r}", file=sys.stderr)
            return 1
        page = json.loads(response.content)
        seen.extend(item["id"] for item in page["items"])
        pages += 1
        cursor = page.get("nextCursor")
        if not cursor:
            break
    if len(seen) != expected or len(set(seen)) != expected:
        print(f"walked {len(seen)} events ({len(set(seen))} distinct) by cursor, expected {expected}", file=sys.stderr)
        return 1
    print(f"generated client: {pages} pages, {len(seen)} events by cursor")
    return 0


if __name__ == "__main__":
    sys.exit(main())
