#!/usr/bin/env python3
"""Prints the workspace's import graph: which crates each crate may use (its workspace
dependencies, from the Cargo.toml files), then, crate by crate, which of its top-level modules
each module uses (`crate::x` / `super::x` in code, tests excluded).

Run from the repository root:  python3 scripts/import-graph.py [--crates-only]
Exit 1 when a crate cycle exists or a shipped binary's crate (agent, plugin, vpcctl) reaches dev tooling
(testkit, lab*, conformance) through its normal dependencies."""
import glob, os, re, sys, tomllib

SHIPPED = {"agent", "plugin", "vpcctl"}
TOOLING = re.compile(r"^(testkit|lab.*|vpc-lab|conformance)$")


def crates():
    out = {}
    for toml in sorted(glob.glob("crates/*/Cargo.toml")):
        with open(toml, "rb") as f:
            c = tomllib.load(f)
        name = c["package"]["name"]
        out[name] = (os.path.dirname(toml), c)
    return out


def workspace_deps(c, names, section):
    return sorted(d for d in c.get(section, {}) if d in names)


def module_edges(src):
    edges = {}
    for path in glob.glob(src + "/**/*.rs", recursive=True):
        rel = os.path.relpath(path, src)[:-3].split(os.sep)
        if rel[-1] == "mod":
            rel = rel[:-1]
        if rel in (["lib"], ["main"]) or "tests" in rel:
            continue
        mod = rel[0]
        text = open(path, encoding="utf-8", errors="replace").read()
        text = re.split(r"#\[cfg\(test\)\]\s*mod tests", text)[0]
        code = "\n".join(l for l in text.splitlines() if not l.strip().startswith("//"))
        refs = set(re.findall(r"\bcrate::([a-z_][a-z0-9_]*)", code))
        for grp in re.findall(r"\bcrate::\{([^}]*)\}", code, flags=re.S):
            refs |= set(re.findall(r"(?:^|,)\s*([a-z_][a-z0-9_]*)", grp))
        if len(rel) == 1:
            refs |= set(re.findall(r"\bsuper::([a-z_][a-z0-9_]*)", code))
        refs.discard(mod)
        edges.setdefault(mod, set()).update(r for r in refs if r != "self")
    mods = set(edges)
    return {m: sorted(r for r in rs if r in mods) for m, rs in sorted(edges.items())}


def reach(graph, start):
    seen, todo = set(), [start]
    while todo:
        for d in graph.get(todo.pop(), []):
            if d not in seen:
                seen.add(d)
                todo.append(d)
    return seen


def main():
    cs = crates()
    names = set(cs)
    graph = {n: workspace_deps(c, names, "dependencies") for n, (_, c) in cs.items()}
    bad = []
    print("crate -> workspace crates it may use (normal deps; [dev: …] for tests only)")
    for n in sorted(graph):
        dev = workspace_deps(cs[n][1], names, "dev-dependencies")
        extra = f"  [dev: {', '.join(dev)}]" if dev else ""
        print(f"  {n} -> {', '.join(graph[n]) or '(none)'}{extra}")
        if n in reach(graph, n):
            bad.append(f"crate cycle through {n}")
        if n in SHIPPED:
            bad += [f"{n} reaches dev tooling {t}" for t in reach(graph, n) if TOOLING.match(t)]
    if "--crates-only" not in sys.argv:
        print("\nmodule -> modules of the same crate it uses")
        for n in sorted(cs):
            src = os.path.join(cs[n][0], "src")
            edges = module_edges(src)
            if not edges:
                continue
            print(f"  {n}:")
            for m, rs in edges.items():
                print(f"    {m} -> {', '.join(rs) or '(none)'}")
    for b in bad:
        print("ERROR:", b, file=sys.stderr)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
