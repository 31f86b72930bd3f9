"""Finds every TensorRT name the code uses and checks it against the imported ``tensorrt``.

Run as a script inside an interpreter that imports the real bindings (stub libraries behind
them): ``python scan.py FILE...`` prints one JSON report. Stdlib only, so it runs in any venv.

What counts as a TensorRT object: the module itself (``trt``, any name bound by
``import tensorrt`` or by ``require_tensorrt()``), what its classes construct, what their
methods and properties return (read from the pybind11 signature docstrings), and parameters
or attributes annotated with ``trt.X``. Uses inside ``if hasattr(obj, "name")`` (or its
negation / ``else``) are version-specific: they are required only where the guard holds.
"""

from __future__ import annotations

import ast
import inspect
import json
import re
import sys

import tensorrt as trt

_RETURN = re.compile(r"->\s*([\w:.]+)")
_SIG = re.compile(r"^(?:\d+\.\s+)?\w+\((.*)\)\s*->", re.M)
MODULE = ("module",)


class Instance:
    def __init__(self, cls) -> None:
        self.cls = cls


class Bound:
    """A method looked up on an instance: calls add ``self``."""

    def __init__(self, func, owner) -> None:
        self.func, self.owner = func, owner


def _resolve_path(path: str):
    obj = trt
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _split_params(text: str) -> list[str]:
    params, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            params.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        params.append(cur.strip())
    return params


def signatures(func) -> list[list[tuple[str, bool]]]:
    """Each overload as [(parameter name, has default)], from the pybind11 docstring."""
    doc = getattr(func, "__doc__", None) or ""
    sigs = []
    for m in _SIG.finditer(doc):
        if m.group(1).strip() == "*args, **kwargs":
            continue
        params = []
        for p in _split_params(m.group(1)):
            name = p.split(":", 1)[0].split("=", 1)[0].strip()
            params.append((name, "=" in p))
        sigs.append(params)
    return sigs


def arity_ok(func, positional: int, keywords: list[str], add_self: bool) -> bool | None:
    """None when the docstring has no signature (e.g. a Python-level function)."""
    sigs = signatures(func)
    if not sigs:
        try:
            inspect.signature(func).bind(*([None] * (positional + add_self)), **dict.fromkeys(keywords))
            return True
        except TypeError:
            return False
        except ValueError:
            return None
    n = positional + (1 if add_self else 0)
    for params in sigs:
        if n > len(params):
            continue
        filled = {name for name, _ in params[:n]}
        names = [name for name, _ in params]
        if any(k not in names or k in filled for k in keywords):
            continue
        filled |= set(keywords)
        if all(name in filled or has_default for name, has_default in params):
            return True
    return False


def returned(doc_owner) -> object | None:
    doc = getattr(doc_owner, "__doc__", None) or ""
    m = _RETURN.search(doc)
    if not m:
        return None
    text = m.group(1)
    if text.startswith("tensorrt.tensorrt."):
        cls = _resolve_path(text[len("tensorrt.tensorrt."):])
    else:  # a C++ type the binding did not name, e.g. nvonnxparser::IParserError for ParserError
        name = re.split(r"::|\.", text)[-1]
        cls = getattr(trt, name, None) or (getattr(trt, name[1:], None) if name.startswith("I") else None)
    return Instance(cls) if isinstance(cls, type) else None


class Scanner(ast.NodeVisitor):
    def __init__(self, path: str, source: str) -> None:
        self.path = path
        self.tree = ast.parse(source, filename=path)
        self.uses: list[dict] = []
        self.branches: list[dict] = []
        self.guards: list[tuple[str, bool]] = []
        self.classes: dict[str, dict[str, object]] = {}  # local class -> self.attr -> type
        # ``trt`` means the module only where the file reaches TensorRT at all (calib has a dict of that name).
        self.reaches_tensorrt = "require_tensorrt" in source or any(
            isinstance(n, (ast.Import, ast.ImportFrom)) and any(a.name == "tensorrt" for a in n.names)
            for n in ast.walk(self.tree))
        self.module_names = {"trt"} if self.reaches_tensorrt else set()
        for node in ast.walk(self.tree):
            if isinstance(node, ast.Import):
                for a in node.names:
                    if a.name == "tensorrt":
                        self.module_names.add(a.asname or a.name)
        self.env: dict[str, object] = {}
        self.cls: str | None = None

    # ---------------------------------------------------------------- reporting

    def use(self, node, kind: str, expr: str, ok: bool, problem: str = "") -> None:
        self.uses.append({"file": self.path, "line": node.lineno, "kind": kind, "expr": expr, "ok": ok,
                          "problem": problem, "guards": list(self.guards)})

    # ---------------------------------------------------------------- types

    def annotation(self, ann) -> object | None:
        if ann is None:
            return None
        if isinstance(ann, ast.Constant) and isinstance(ann.value, str):
            try:
                ann = ast.parse(ann.value, mode="eval").body
            except SyntaxError:
                return None
        if isinstance(ann, ast.Name) and ann.id in self.classes:
            return ("local", ann.id)
        if isinstance(ann, ast.Attribute):
            chain = ast.unparse(ann)
            head, _, rest = chain.partition(".")
            if head in self.module_names:
                cls = _resolve_path(rest)
                if isinstance(cls, type):
                    return Instance(cls)
                self.use(ann, "annotation", chain, False, f"tensorrt has no {rest}")
        return None

    def typeof(self, node) -> object | None:
        if isinstance(node, ast.Name):
            if node.id in self.module_names:
                return MODULE
            return self.env.get(node.id)
        if isinstance(node, ast.Attribute):
            return self.attribute(node, self.typeof(node.value))
        if isinstance(node, ast.Call):
            return self.call(node)
        for child in ast.iter_child_nodes(node):  # operators, subscripts, comprehensions: check inside
            if isinstance(child, ast.expr):
                self.typeof(child)
            elif isinstance(child, ast.comprehension):
                self.typeof(child.iter)
                for cond in child.ifs:
                    self.typeof(cond)
        return None

    def attribute(self, node: ast.Attribute, base, store: bool = False) -> object | None:
        expr = ast.unparse(node)
        if isinstance(node.value, ast.Name) and node.value.id == "self" and self.cls:
            return self.classes[self.cls].get(node.attr)
        if isinstance(base, tuple) and base[0] == "local":
            return self.classes.get(base[1], {}).get(node.attr)
        if base is MODULE:
            obj = getattr(trt, node.attr, None)
            self.use(node, "name", expr, obj is not None, f"tensorrt has no {node.attr}")
            return obj
        if isinstance(base, type):  # a class or enum looked up on its class
            obj = getattr(base, node.attr, None)
            self.use(node, "name", expr, obj is not None, f"{base.__name__} has no {node.attr}")
            return obj
        if isinstance(base, Instance) and base.cls is not None:
            obj = inspect.getattr_static(base.cls, node.attr, None)
            if obj is None:
                for klass in base.cls.__mro__:  # pybind11 properties and methods live on a base
                    obj = klass.__dict__.get(node.attr)
                    if obj is not None:
                        break
            name = f"{base.cls.__name__}.{node.attr}"
            if obj is None:
                self.use(node, "attribute", expr, False, f"{name} does not exist")
                return None
            if isinstance(obj, property):
                if store:
                    self.use(node, "property-set", expr, obj.fset is not None, f"{name} is read-only")
                else:
                    self.use(node, "property", expr, True)
                return returned(obj.fget)
            self.use(node, "method", expr, True)
            return Bound(obj, base.cls)
        return None

    def call(self, node: ast.Call) -> object | None:
        func = node.func
        if isinstance(func, ast.Name) and func.id == "require_tensorrt":
            return MODULE
        if isinstance(func, ast.Name) and func.id in ("getattr", "hasattr") and len(node.args) >= 2:
            self.probe(node)
            return None
        target = self.typeof(func)
        for arg in [*node.args, *[k.value for k in node.keywords]]:
            self.typeof(arg)
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            return None
        positional, keywords = len(node.args), [k.arg for k in node.keywords]
        expr = ast.unparse(func)
        if isinstance(target, type) and target.__module__.startswith("tensorrt"):
            ok = arity_ok(target.__init__, positional, keywords, add_self=True)
            if ok is not None:
                self.use(node, "call", expr, ok, f"{target.__name__}() takes no such arguments: {_sig_text(target.__init__)}")
            return Instance(target)
        if isinstance(target, Bound):
            ok = arity_ok(target.func, positional, keywords, add_self=True)
            if ok is not None:
                self.use(node, "call", expr, ok, f"{expr}() does not match {_sig_text(target.func)}")
            return returned(target.func)
        if type(target).__name__ in ("instancemethod", "builtin_function_or_method") or (
                callable(target) and str(getattr(target, "__module__", "")).startswith("tensorrt")):
            ok = arity_ok(target, positional, keywords, add_self=False)
            if ok is not None:
                self.use(node, "call", expr, ok, f"{expr}() does not match {_sig_text(target)}")
            return returned(target)
        return None

    def probe(self, node: ast.Call) -> None:
        base = self.typeof(node.args[0])
        name = node.args[1].value if isinstance(node.args[1], ast.Constant) else None
        if name is None or base is None:
            return
        owner = _owner(base)
        if owner is None:
            return
        has = getattr(owner, name, None) is not None
        self.uses.append({"file": self.path, "line": node.lineno, "kind": "probe",
                          "expr": f"{getattr(owner, '__name__', owner)}.{name}", "ok": True, "problem": "",
                          "guards": list(self.guards), "present": has})

    def guard_of(self, test) -> tuple[str, bool, bool] | None:
        """(key, truth here, polarity) of an ``if hasattr(x, "n")`` / ``if not hasattr(...)``."""
        negate = False
        if isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
            test, negate = test.operand, True
        if (isinstance(test, ast.Call) and isinstance(test.func, ast.Name) and test.func.id == "hasattr"
                and len(test.args) == 2 and isinstance(test.args[1], ast.Constant)):
            base = self.typeof(test.args[0])
            owner = _owner(base)
            if owner is None:
                return None
            self.probe(test)
            key = f"{self.path}:{test.lineno}:{getattr(owner, '__name__', owner)}.{test.args[1].value}"
            return key, getattr(owner, test.args[1].value, None) is not None, not negate
        return None

    # ---------------------------------------------------------------- statements

    def visit_ClassDef(self, node: ast.ClassDef) -> None:
        self.classes.setdefault(node.name, {})
        bases = [self.typeof(b) for b in node.bases]
        outer_cls, outer_env = self.cls, self.env
        self.cls = node.name
        for base in bases:
            if isinstance(base, type) and base.__module__.startswith("tensorrt"):
                self.overrides(node, base)
        for _ in range(2):  # attributes assigned in a later method are known in earlier ones
            for stmt in node.body:
                self.visit(stmt)
        self.cls, self.env = outer_cls, outer_env

    def overrides(self, node: ast.ClassDef, base: type) -> None:
        for stmt in node.body:
            if isinstance(stmt, ast.FunctionDef) and not stmt.name.startswith("__"):
                theirs = getattr(base, stmt.name, None)
                expr = f"{base.__name__}.{stmt.name}"
                if theirs is None:
                    self.use(stmt, "override", expr, False, f"{base.__name__} has no method {stmt.name} to override")
                    continue
                ok = arity_ok(theirs, len(stmt.args.args) - 1, [], add_self=True)
                if ok is not None:
                    self.use(stmt, "override", expr, ok, f"{stmt.name} takes {len(stmt.args.args)} parameters; "
                             f"TensorRT calls {_sig_text(theirs)}")

    def visit_FunctionDef(self, node) -> None:
        outer = self.env
        self.env = dict(outer)
        args = [*node.args.posonlyargs, *node.args.args, *node.args.kwonlyargs]
        for a in args:
            t = self.annotation(a.annotation)
            if t is not None:
                self.env[a.arg] = t
            elif a.arg in self.module_names:
                self.env[a.arg] = MODULE
        if self.cls and args and args[0].arg == "self":
            self.env["self"] = ("local", self.cls)
        for stmt in node.body:
            self.visit(stmt)
        self.env = outer

    visit_AsyncFunctionDef = visit_FunctionDef

    def assign(self, target, value_type) -> None:
        if isinstance(target, ast.Name):
            if value_type is not None:
                self.env[target.id] = value_type
            else:
                self.env.pop(target.id, None)
        elif isinstance(target, ast.Attribute):
            if isinstance(target.value, ast.Name) and target.value.id == "self" and self.cls:
                if value_type is not None:
                    self.classes[self.cls][target.attr] = value_type
                return
            self.attribute(target, self.typeof(target.value), store=True)

    def visit_Assign(self, node: ast.Assign) -> None:
        for target in node.targets:
            if (isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple)
                    and len(target.elts) == len(node.value.elts)):
                for t, v in zip(target.elts, node.value.elts):
                    self.assign(t, self.typeof(v))
            else:
                self.assign(target, self.typeof(node.value))

    def visit_AnnAssign(self, node: ast.AnnAssign) -> None:
        t = self.annotation(node.annotation)
        if node.value is not None:
            t = t or self.typeof(node.value)
        self.assign(node.target, t)

    def visit_If(self, node: ast.If) -> None:
        guard = self.guard_of(node.test)
        if guard is None:
            self.typeof(node.test)
            for stmt in [*node.body, *node.orelse]:
                self.visit(stmt)
            return
        key, truth, polarity = guard
        for body, branch in ((node.body, polarity), (node.orelse, not polarity)):
            if not body:
                continue
            self.guards.append((key, branch))
            before = len(self.uses)
            for stmt in body:
                self.visit(stmt)
            self.guards.pop()
            self.branches.append({"guard": key, "branch": branch, "entered": truth == branch,
                                  "uses": len(self.uses) - before, "line": body[0].lineno, "file": self.path})

    def visit_Expr(self, node: ast.Expr) -> None:
        self.typeof(node.value)

    def visit_Return(self, node: ast.Return) -> None:
        if node.value is not None:
            self.typeof(node.value)

    def generic_visit(self, node) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.stmt):
                self.visit(child)
            elif isinstance(child, ast.expr):
                self.typeof(child)


def _owner(base):
    """What ``hasattr``/``getattr`` looks into, when it is TensorRT's."""
    if base is MODULE:
        return trt
    if isinstance(base, Instance):
        return base.cls
    if isinstance(base, type) and base.__module__.startswith("tensorrt"):
        return base
    return None


def _sig_text(func) -> str:
    doc = (getattr(func, "__doc__", None) or "").strip()
    lines = [line for line in doc.splitlines() if "->" in line]
    return " | ".join(line.strip() for line in lines[:3]) or "(no signature)"


def scan(paths: list[str]) -> dict:
    uses: dict[str, dict] = {}
    branches: dict[str, dict] = {}
    for path in paths:
        with open(path, encoding="utf-8") as f:
            s = Scanner(path, f.read())
        s.visit(s.tree)
        # Class bodies are visited twice; the same use is reported once.
        for u in s.uses:
            uses.setdefault(json.dumps([u["file"], u["line"], u["kind"], u["expr"], u["guards"]]), u)
        for b in s.branches:
            branches.setdefault(json.dumps([b["guard"], b["branch"]]), b)
    return {"version": trt.__version__, "uses": list(uses.values()), "branches": list(branches.values())}


if __name__ == "__main__":
    json.dump(scan(sys.argv[1:]), sys.stdout)
