"""The real e2b-code-interpreter SDK against Ember: run_code in the default
context (state kept between cells, the last expression's value, stdout and
stderr, errors, execution counts), a context of its own, and a matplotlib
figure as a PNG result. Prints one line per step; any failure raises."""

import base64

from e2b_code_interpreter import Sandbox


def step(name):
    print(f"ok {name}", flush=True)


sb = Sandbox.create()
try:
    first = sb.run_code("x = 6 * 7\nprint('side effect')\nx")
    assert first.text == "42", first
    assert first.logs.stdout == ["side effect\n"], first.logs
    assert first.error is None and first.execution_count == 1, first
    again = sb.run_code("import sys\nprint('oops', file=sys.stderr)\nx + 1")
    assert again.text == "43" and again.logs.stderr == ["oops\n"], again
    step("state, results, stdout, stderr")

    failed = sb.run_code("1 / 0")
    assert failed.error is not None and failed.error.name == "ZeroDivisionError", failed
    assert "division by zero" in failed.error.value and "Traceback" in failed.error.traceback
    step("errors")

    seen = []
    sb.run_code("for i in range(3): print(i)", on_stdout=lambda m: seen.append(m))
    assert len(seen) >= 1, seen
    step("streamed output")

    ctx = sb.create_code_context()
    sb.run_code("y = 'own'", context=ctx)
    assert sb.run_code("y", context=ctx).text == "'own'"
    assert sb.run_code("'y' in dir()").text == "False", "contexts share nothing"
    step("a context of its own")

    plot = sb.run_code(
        "import matplotlib.pyplot as plt\nplt.plot([1, 4, 9])\nplt.title('squares')\nplt.show()"
    )
    pngs = [r.png for r in plot.results if r.png]
    assert pngs and base64.b64decode(pngs[0]).startswith(b"\x89PNG"), plot
    step("a matplotlib figure as PNG")
finally:
    sb.kill()
step("done")
