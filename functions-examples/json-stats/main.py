"""Read a JSON array of objects (or of numbers) on stdin; print a summary as JSON.

Numeric fields get count/min/max/mean/stdev; text fields get the number of
distinct values and the three most common. Bad input exits 2 with a message
on stderr.
"""
import json
import statistics
import sys
from collections import Counter


def summarise(values):
    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if nums and len(nums) == len(values):
        return {
            "count": len(nums),
            "min": min(nums),
            "max": max(nums),
            "mean": statistics.fmean(nums),
            "stdev": statistics.stdev(nums) if len(nums) > 1 else 0.0,
        }
    texts = Counter(json.dumps(v) if not isinstance(v, str) else v for v in values)
    return {"count": len(values), "distinct": len(texts), "top": texts.most_common(3)}


def main():
    try:
        data = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        print(f"input is not JSON: {e}", file=sys.stderr)
        return 2
    if not isinstance(data, list):
        print("input must be a JSON array", file=sys.stderr)
        return 2
    if all(isinstance(r, dict) for r in data):
        fields = {}
        for r in data:
            for k, v in r.items():
                fields.setdefault(k, []).append(v)
        out = {"records": len(data), "fields": {k: summarise(v) for k, v in sorted(fields.items())}}
    else:
        out = {"records": len(data), "values": summarise(data)}
    json.dump(out, sys.stdout, indent=2)
    print()
    return 0


sys.exit(main())
