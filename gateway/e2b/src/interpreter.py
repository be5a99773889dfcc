import ast, base64, io, json, os, sys, traceback

OUT = sys.__stdout__
MARK = "\x1eEMBER "


def emit(d):
    OUT.write(MARK + json.dumps(d) + "\n")
    OUT.flush()


class Stream:
    """A cell's stdout or stderr, sent a whole line at a time (as Jupyter
    sends a print), the rest when the cell ends."""

    def __init__(self, kind):
        self.kind = kind
        self.pending = ""

    def write(self, text):
        self.pending += text
        cut = self.pending.rfind("\n") + 1
        if cut:
            emit({"type": self.kind, "text": self.pending[:cut]})
            self.pending = self.pending[cut:]
        return len(text)

    def flush(self):
        pass

    def close_cell(self):
        if self.pending:
            emit({"type": self.kind, "text": self.pending})
            self.pending = ""

    def isatty(self):
        return False


def figures():
    plt = sys.modules.get("matplotlib.pyplot")
    if plt is None:
        return
    for num in plt.get_fignums():
        buf = io.BytesIO()
        plt.figure(num).savefig(buf, format="png")
        emit({"type": "result", "png": base64.b64encode(buf.getvalue()).decode(), "is_main_result": False})
    plt.close("all")


scope = {"__name__": "__main__"}
count = 0
for line in sys.stdin:
    try:
        req = json.loads(line)
    except ValueError:
        continue
    count += 1
    emit({"type": "begin", "id": req.get("id")})
    os.environ.update(req.get("env") or {})
    out, err = Stream("stdout"), Stream("stderr")
    sys.stdout, sys.stderr = out, err
    try:
        tree = ast.parse(req.get("code", ""), "<cell>", "exec")
        last = None
        if tree.body and isinstance(tree.body[-1], ast.Expr):
            last = ast.Expression(tree.body.pop().value)
        exec(compile(tree, "<cell>", "exec"), scope)
        value = eval(compile(last, "<cell>", "eval"), scope) if last is not None else None
        figures()
        if value is not None:
            emit({"type": "result", "text": repr(value), "is_main_result": True})
    except BaseException as e:  # the cell's error, whatever it is
        tb = traceback.format_exc()
        emit({"type": "error", "name": type(e).__name__, "value": str(e), "traceback": tb})
    finally:
        out.close_cell()
        err.close_cell()
        sys.stdout, sys.stderr = sys.__stdout__, sys.__stderr__
    emit({"type": "number_of_executions", "execution_count": count})
    emit({"type": "end", "id": req.get("id")})
