"""Count primes below `limit` (JSON {"limit": N} on stdin; default 1000000)."""
import json
import sys
import time

MAX_LIMIT = 50_000_000


def main():
    raw = sys.stdin.read().strip()
    try:
        limit = int(json.loads(raw).get("limit", 1_000_000)) if raw else 1_000_000
    except (ValueError, AttributeError, TypeError) as e:
        print(f'input must be {{"limit": N}}: {e}', file=sys.stderr)
        return 2
    if not 2 <= limit <= MAX_LIMIT:
        print(f"limit must be between 2 and {MAX_LIMIT}", file=sys.stderr)
        return 2
    started = time.monotonic()
    sieve = bytearray([1]) * limit
    sieve[0:2] = b"\x00\x00"
    for i in range(2, int(limit**0.5) + 1):
        if sieve[i]:
            sieve[i * i :: i] = bytes(len(range(i * i, limit, i)))
    count = sieve.count(1)
    largest = sieve.rindex(1)
    took = round((time.monotonic() - started) * 1000)
    print(json.dumps({"limit": limit, "primes": count, "largest": largest, "ms": took}))
    return 0


sys.exit(main())
