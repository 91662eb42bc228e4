#!/usr/bin/env python3
"""Module circles in a Rust crate, at file granularity.

An edge A -> B is any path in A's non-test code (a `use` tree or a
qualified path: `crate::…`, `super::…`, `self::…`, or a child module's
name) that resolves to the module file B, parents and children included.
Prints every strongly connected component of more than one module and
exits 1 if there is any: `cargo xtask test` runs it over mtlb-userspace."""
import os, re, sys
from collections import defaultdict
root = sys.argv[1]  # e.g. mtlb-userspace/src
mods = {}
for d, _, fs in os.walk(root):
    for f in fs:
        if not f.endswith('.rs'): continue
        p = os.path.join(d, f); rel = os.path.relpath(p, root)[:-3]
        parts = rel.split('/')
        if parts[-1] in ('mod',): parts = parts[:-1]
        if parts in (['lib'], ['main']): parts = []
        mods[tuple(parts)] = p
def strip(src):
    src = re.sub(r'//[^\n]*', '', src)
    src = re.sub(r'/\*.*?\*/', '', src, flags=re.S)
    # drop #[cfg(test)] mod tests { ... } blocks crudely: from "#[cfg(test)]" to end of file
    i = src.find('#[cfg(test)]')
    return src if i < 0 else src[:i]
def resolve(cur, path):
    segs = path.split('::')
    if segs[0] == 'crate': base = []; segs = segs[1:]
    elif segs[0] in ('super', 'self'):
        base = list(cur)
        while segs and segs[0] in ('super','self'):
            if segs[0] == 'super': base = base[:-1]
            segs = segs[1:]
    else: return None
    full = base + segs
    for n in range(len(full), -1, -1):
        if tuple(full[:n]) in mods: return tuple(full[:n])
    return None

def expand(tree):
    """Expand a use tree string like 'a::{b, c::{d, e}}' into paths."""
    tree = tree.strip()
    # find top-level '{'
    depth = 0
    for i, ch in enumerate(tree):
        if ch == '{':
            if depth == 0:
                prefix = tree[:i].rstrip(':').strip()
                inner = tree[i+1:tree.rindex('}')]
                parts, d, cur = [], 0, ''
                for c2 in inner:
                    if c2 == '{': d += 1
                    if c2 == '}': d -= 1
                    if c2 == ',' and d == 0: parts.append(cur); cur = ''
                    else: cur += c2
                parts.append(cur)
                res = []
                for p in parts:
                    p = p.strip()
                    if not p: continue
                    if p == 'self': res.append(prefix); continue
                    res += [prefix + '::' + q if prefix else q for q in expand(p)]
                return res
            depth += 1
    return [tree.split(' as ')[0].strip()]
edges = defaultdict(set)
for m, p in mods.items():
    src = strip(open(p).read())
    paths = []
    for mm in re.finditer(r'\buse\s+([^;]*);', src):
        paths += expand(mm.group(1))
    for mm in re.finditer(r'(?<![:\w])([a-z_][a-z0-9_]*(?:::[A-Za-z_][A-Za-z0-9_]*)+)', src):
        paths.append(mm.group(1))
    for t in paths:
        t = re.sub(r'\s+', '', t)
        if not re.match(r'(crate|super|self)\b', t):
            if tuple(list(m) + [t.split('::')[0]]) in mods: t = 'self::' + t
            else: continue
        r = resolve(m, t)
        if r is not None and r != m:
            edges[m].add(r)
# Tarjan
idx = {}; low = {}; st = []; on = set(); out = []; c = [0]
sys.setrecursionlimit(10000)
def sc(v):
    idx[v] = low[v] = c[0]; c[0] += 1; st.append(v); on.add(v)
    for w in edges[v]:
        if w not in idx: sc(w); low[v] = min(low[v], low[w])
        elif w in on: low[v] = min(low[v], idx[w])
    if low[v] == idx[v]:
        comp = []
        while True:
            w = st.pop(); on.discard(w); comp.append(w)
            if w == v: break
        if len(comp) > 1: out.append(comp)
for v in list(mods): 
    if v not in idx: sc(v)
name = lambda m: '::'.join(m) or 'crate'
for comp in out:
    print('circle:', ', '.join(sorted(name(m) for m in comp)))
    for a in comp:
        for b in edges[a]:
            if b in comp: print('   ', name(a), '->', name(b))
print(f'{len(mods)} modules, {sum(len(e) for e in edges.values())} edges, {len(out)} circles')
sys.exit(1 if out else 0)
