"""Draw a line chart from JSON on stdin and write it to stdout as PNG.

Input: {"series": {"name": [y0, y1, ...], ...}, "x": [x0, ...] (optional),
"title": "..." (optional)}, or a bare list of numbers for one series. Bad input
exits 2 with a message on stderr. Runs in the python-data image, whose
pre-warmed Python has numpy and matplotlib (Agg backend) imported already.
"""
import io
import json
import sys

import matplotlib.pyplot as plt

MAX_POINTS = 100_000


def fail(message):
    print(message, file=sys.stderr)
    sys.exit(2)


def main():
    try:
        data = json.load(sys.stdin)
    except json.JSONDecodeError as e:
        fail(f"input is not JSON: {e}")
    if isinstance(data, list):
        data = {"series": {"y": data}}
    if not isinstance(data, dict) or not isinstance(data.get("series"), dict) or not data["series"]:
        fail('give {"series": {"name": [numbers]}} or a list of numbers')
    series = data["series"]
    total = 0
    for name, ys in series.items():
        if not isinstance(ys, list) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in ys
        ):
            fail(f"series {name!r} must be a list of numbers")
        total += len(ys)
    if total > MAX_POINTS:
        fail(f"{total} points; at most {MAX_POINTS}")
    xs = data.get("x")
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for name, ys in series.items():
        if isinstance(xs, list) and len(xs) == len(ys):
            ax.plot(xs, ys, label=str(name))
        else:
            ax.plot(ys, label=str(name))
    if len(series) > 1:
        ax.legend()
    ax.set_title(str(data.get("title", "")))
    ax.grid(True, alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    sys.stdout.buffer.write(buf.getvalue())


if __name__ == "__main__":
    main()
