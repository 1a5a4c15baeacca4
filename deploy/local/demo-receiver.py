"""The demo "SIEM" of `make run`: a webhook receiver on loopback that answers 204 and appends one
line per delivered event (id, type, organization from the batch) to the file given as argv[2].
It checks nothing: the stream tests verify signatures with the standardwebhooks package."""

import http.server
import json
import sys


class Receiver(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", 0)))
        try:
            events = json.loads(body)["data"]["events"]
        except (ValueError, KeyError, TypeError):
            self.send_response(400)
            self.end_headers()
            return
        with open(sys.argv[2], "a", encoding="utf-8") as out:
            for event in events:
                out.write(f"{event.get('timestamp')} {event.get('eventType')} {event.get('id')} "
                          f"(webhook-id {self.headers.get('webhook-id')})\n")
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Receiver).serve_forever()
