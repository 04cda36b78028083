#!/usr/bin/env python3
"""How far a live reader of the change feed falls behind the log during a load.

    loadtest/tools/feed-lag.py http://127.0.0.1:PORT SECONDS

Follows GET /v1/events as Server-Sent Events (from the end of the feed when it starts)
and scrapes GET /metrics every 100 ms for stockd_log_durable_sequence (the last record
flushed) and stockd_events_through_seq (the last record the feed has passed). Prints one
JSON object: events received, how many log records the reader was behind the log at each
scrape (p50, p99, max), how long after a record was durable the reader had it (p50, p99,
max, in ms), the projector's own lag in records, and whether the server dropped the reader.
Standard library only.
"""

import bisect
import http.client
import json
import sys
import threading
import time
import urllib.parse


def metrics(host, port):
    conn = http.client.HTTPConnection(host, port, timeout=5)
    conn.request("GET", "/metrics")
    text = conn.getresponse().read().decode()
    conn.close()
    values = {}
    for line in text.splitlines():
        if line.startswith("stockd_") and " " in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    return values


def percentile(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def main():
    base, seconds = sys.argv[1], float(sys.argv[2])
    url = urllib.parse.urlparse(base)
    host, port = url.hostname, url.port
    start = metrics(host, port)
    after = int(start.get("stockd_events_through_seq", 0))
    received = []  # (monotonic time, seq)
    state = {"ended": False, "events": 0}

    def follow():
        conn = http.client.HTTPConnection(host, port, timeout=seconds + 30)
        conn.request("GET", f"/v1/events?after={after}", headers={"Accept": "text/event-stream"})
        response = conn.getresponse()
        deadline = time.monotonic() + seconds + 5
        while time.monotonic() < deadline:
            line = response.fp.readline()
            if not line:
                state["ended"] = True
                return
            if line.startswith(b"id:"):
                seq = int(line[3:].strip().split(b".")[0])
                state["events"] += 1
                received.append((time.monotonic(), seq))

    reader = threading.Thread(target=follow, daemon=True)
    reader.start()
    samples = []  # (monotonic time, durable, through)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        m = metrics(host, port)
        samples.append(
            (time.monotonic(), int(m["stockd_log_durable_sequence"]), int(m["stockd_events_through_seq"]))
        )
        time.sleep(0.1)
    time.sleep(1.0)
    behind, delays, projector = [], [], []
    times = [t for t, _ in received]
    seqs = [seq for _, seq in received]  # in feed order: never decreasing
    for at, durable, through in samples:
        projector.append(durable - through)
        i = bisect.bisect_right(times, at)
        got = seqs[i - 1] if i > 0 else after
        behind.append(max(0, durable - got))
        # How long after this scrape did the reader have an event of a record at or past
        # `durable` (0 if it had one already)?
        if durable <= after:
            continue
        if got >= durable:
            delays.append(0.0)
            continue
        j = max(bisect.bisect_left(seqs, durable), i)
        if j < len(times):
            delays.append((times[j] - at) * 1000)
    dropped = metrics(host, port).get("stockd_events_sse_dropped_total", 0)
    print(
        json.dumps(
            {
                "seconds": seconds,
                "events_received": state["events"],
                "stream_ended": state["ended"],
                "dropped_total": dropped,
                "records_behind_log": {
                    "p50": percentile(behind, 0.5),
                    "p99": percentile(behind, 0.99),
                    "max": max(behind, default=None),
                },
                "projector_records_behind_log": {
                    "p50": percentile(projector, 0.5),
                    "p99": percentile(projector, 0.99),
                    "max": max(projector, default=None),
                },
                "delay_after_durable_ms": {
                    "p50": percentile(delays, 0.5),
                    "p99": percentile(delays, 0.99),
                    "max": max(delays, default=None),
                    "samples": len(delays),
                },
            }
        )
    )


if __name__ == "__main__":
    main()
