"""Schemathesis hooks of the API fuzz step (deploy/local/fuzz-api.sh): the two rules of the
contract that OpenAPI cannot state are kept out of the generated requests, so that every check,
"schema-valid request rejected" included, can run.

- `cursor` accepts only a token this service issued for the same filters and sort. Random strings
  are rightly refused with 400; real cursors are exercised by the generated-client walk
  (deploy/tests/generated_client.py) and by the integration tests.
- `from` must be before `to` (400 otherwise; services/api/src/query.rs tests it).
"""

from datetime import datetime

import schemathesis


def _instant(text):
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return None


@schemathesis.hook
def filter_query(ctx, query):
    if not query:
        return True
    if "cursor" in query:
        return False
    start, end = _instant(query.get("from")), _instant(query.get("to"))
    if start is not None and end is not None:
        try:
            return start < end
        except TypeError:  # one naive, one aware: the API refuses it as a bad format
            return True
    return True


@schemathesis.hook
def filter_case(ctx, case):
    # The coverage phase builds whole cases without passing through filter_query.
    return filter_query(ctx, case.query)
