#!/usr/bin/env python3
"""Plots of `vpc-lab perf` samples: docs/perf-add-del.png, docs/perf-concurrent.png,
docs/perf-pods.png.

usage: .venv/bin/python scripts/bench/plot.py perf.json [outdir=docs] [before.json]
With before.json (a run of an earlier commit), also docs/perf-before-after.png: forwarding
against the pod count, before and after.
(matplotlib: .venv/bin/pip install matplotlib)
"""
import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    src = sys.argv[1]
    out = sys.argv[2] if len(sys.argv) > 2 else "docs"
    r = json.load(open(src))

    if r.get("cycle"):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.boxplot(
            [c["add_del_ms"] for c in r["cycle"]],
            tick_labels=[c["plugin"] for c in r["cycle"]],
            showfliers=True,
        )
        ax.set_ylabel("ADD+DEL of one pod (ms)")
        ax.set_title(f"ADD+DEL cycle, warm pool ({len(r['cycle'][0]['add_del_ms'])} cycles each)")
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        fig.savefig(f"{out}/perf-add-del.png", dpi=100)

    if r.get("concurrent"):
        fig, ax = plt.subplots(figsize=(6, 4))
        for c in r["concurrent"]:
            s = sorted(c["add_ms"])
            ax.plot(s, [(i + 1) for i in range(len(s))], label=f"{c['plugin']} (all ready {c['wall_ms']:.0f} ms)")
        ax.set_xlabel("ms after the start")
        ax.set_ylabel("pods ready")
        ax.set_title(f"{r['concurrent'][0]['pods']} concurrent ADDs on one instance")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{out}/perf-concurrent.png", dpi=100)

    lv = [l for l in r.get("levels", []) if l["udp_pps_from_pod"]]
    if lv:
        fig, ax = plt.subplots(figsize=(6, 4))
        for key, label in [
            ("udp_pps_from_pod", "pod → instance2"),
            ("udp_pps_to_pod", "instance2 → pod"),
            ("udp_pps_control", "control: instance2 → vpc-host (fabric only)"),
        ]:
            xs, ys = [], []
            for l in lv:
                for v in l.get(key, []):
                    xs.append(l["pods"])
                    ys.append(v / 1e3)
            ax.plot(xs, ys, "o", label=label)
        ax.set_xlabel("pods on instance1")
        ax.set_ylabel("64-byte UDP received (kpps)")
        ax.set_ylim(bottom=0)
        ax.set_title("Forwarding through instance1 against its pod count")
        ax.legend()
        fig.tight_layout()
        fig.savefig(f"{out}/perf-pods.png", dpi=100)

    if len(sys.argv) > 3:
        before = json.load(open(sys.argv[3]))
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for run, name, style in [(before, "before", "x--"), (r, "after", "o-")]:
            lv = [l for l in run.get("levels", []) if l["udp_pps_from_pod"]]
            for key, label in [
                ("udp_pps_from_pod", "pod → instance2"),
                ("udp_pps_control", "control (fabric only)"),
            ]:
                xs = [l["pods"] for l in lv]
                ys = [sorted(l[key])[len(l[key]) // 2] / 1e3 for l in lv]
                rules = "/".join(str(l["ip_rules"]) for l in lv)
                ax.plot(xs, ys, style, label=f"{name}: {label} (ip rules {rules})")
        ax.set_xlabel("pods on instance1")
        ax.set_ylabel("64-byte UDP received, median (kpps)")
        ax.set_ylim(bottom=0)
        ax.set_title("Forwarding vs pods: from-rule per pod (before), fwmark rule per ENI (after)", fontsize=10)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(f"{out}/perf-before-after.png", dpi=100)


if __name__ == "__main__":
    main()
