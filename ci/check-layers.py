#!/usr/bin/env python3
"""Fails on an import loop in src/: between top-level modules, or between the files (and sub-folders) of one folder.

It reads every `use crate::...`, `use super::...` and inline `crate::...` / `super::...` path in the non-test part
of each file (everything before the first `#[cfg(test)]`), resolves it to the module it names, and looks for cycles.
A folder's `mod.rs` is its face (it declares and re-exports its children), so it takes part in the top-level graph
but not in the graph of its own folder's files.
Usage: python3 ci/check-layers.py [src-dir]
"""
import os
import re
import sys

SRC = sys.argv[1] if len(sys.argv) > 1 else "src"


def module_of(path):
    rel = os.path.relpath(path, SRC)[:-3].split(os.sep)
    if rel[-1] == "mod":
        rel = rel[:-1]
    if rel in (["lib"], ["main"]):
        return ()
    return tuple(rel)


files = {}
for root, _, names in os.walk(SRC):
    for n in names:
        if n.endswith(".rs"):
            p = os.path.join(root, n)
            files[module_of(p)] = p
modules = set(files)


def strip(text):
    """The code of a file before its tests, with comments, strings and char literals blanked."""
    text = text.split("#[cfg(test)]")[0]
    out, i, n = [], 0, len(text)
    while i < n:
        c = text[i]
        if text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            i = n if j < 0 else j + 2
        elif c == "r" and re.match(r'r#*"', text[i:]) and not (i and (text[i - 1].isalnum() or text[i - 1] == "_")):
            hashes = re.match(r"r(#*)\"", text[i:]).group(1)
            j = text.find('"' + hashes, i + 2 + len(hashes))
            out.append('""')
            i = n if j < 0 else j + 1 + len(hashes)
        elif c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append('""')
            i = j + 1
        elif c == "'" and re.match(r"'(?:[^'\\\n]|\\.[^']*)'", text[i:]):
            m = re.match(r"'(?:[^'\\\n]|\\.[^']*)'", text[i:])
            out.append("' '")
            i += m.end()
        else:
            out.append(c)
            i += 1
    return "".join(out)


def expand(prefix, body):
    """`a::{b, c::{d}}` -> [a::b, a::c::d]"""
    body = body.strip()
    if not body.startswith("{"):
        return [prefix + [s for s in body.split("::") if s]]
    depth, cur, parts = 0, "", []
    for ch in body[1:-1]:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    out = []
    for part in parts:
        part = part.strip()
        if not part:
            continue
        m = re.match(r"^([A-Za-z0-9_:]*?)(::)?(\{.*\})$", part, re.S)
        if m and m.group(3):
            head = [s for s in m.group(1).split("::") if s]
            out += expand(prefix + head, m.group(3))
        else:
            out.append(prefix + [s for s in part.split(" as ")[0].split("::") if s])
    return out


def resolve(mod, segs):
    if not segs:
        return None
    if segs[0] == "crate":
        base, rest = [], segs[1:]
    elif segs[0] in ("super", "self"):
        base = list(mod)
        rest = segs
        while rest and rest[0] in ("super", "self"):
            if rest[0] == "super":
                base = base[:-1]
            rest = rest[1:]
    else:
        return None
    path = base + rest
    for i in range(len(path), -1, -1):
        if tuple(path[:i]) in modules:
            return tuple(path[:i])
    return None


edges = set()
for mod, path in files.items():
    text = strip(open(path, encoding="utf-8").read())
    refs = []
    for m in re.finditer(r"\buse\s+((?:crate|super|self)\b[^;]*);", text, re.S):
        stmt = re.sub(r"\s+", "", m.group(1))
        head, _, tail = stmt.partition("::{")
        refs += expand(head.split("::"), "{" + tail) if tail else [stmt.split(" as ")[0].split("::")]
    for m in re.finditer(r"(?<![\w:])((?:crate|super)(?:::\w+)+)", text):
        refs.append(m.group(1).split("::"))
    for r in refs:
        t = resolve(mod, [s.split(" as ")[0] for s in r])
        if t is not None and t != mod:
            edges.add((mod, t))


def cycles(graph):
    """Strongly connected components with more than one node (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def graph_under(folder):
    g = {}
    n = len(folder)
    for a, b in edges:
        if a[:n] == folder and b[:n] == folder and len(a) > n and len(b) > n and a[n] != b[n]:
            g.setdefault(a[n], set()).add(b[n])
    return g


failed = False
folders = sorted({m[:i] for m in modules for i in range(len(m))})
for folder in folders:
    for comp in cycles(graph_under(folder)):
        failed = True
        where = "::".join(("crate",) + folder)
        g = graph_under(folder)
        detail = "; ".join(f"{a} -> {', '.join(sorted(set(g[a]) & set(comp)))}" for a in comp)
        print(f"import loop in {where}: {' <-> '.join(comp)}  ({detail})")
if failed:
    sys.exit(1)
print(f"no import loops ({len(modules)} modules, {len(edges)} edges)")
