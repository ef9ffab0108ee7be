#!/usr/bin/env python3
"""Plots `kl bench` JSON reports of a rate sweep: TTFT and TPOT percentiles and
goodput against the offered request rate.
Usage: bench_plot.py OUT.png report1.json report2.json ...  (needs matplotlib)"""
import json
import sys

import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main():
    out, files = sys.argv[1], sys.argv[2:]
    rows = sorted((json.load(open(f)) for f in files), key=lambda j: j["request_rate"])
    rate = [j["request_rate"] for j in rows]
    fig, ax = plt.subplots(1, 3, figsize=(15, 4.2))
    for p in ("p50", "p90", "p99"):
        ax[0].plot(rate, [j["ttft_seconds"][p] * 1e3 for j in rows], marker="o", label=p)
        ax[1].plot(rate, [j["tpot_seconds"][p] * 1e3 for j in rows], marker="o", label=p)
    ax[0].set(title="TTFT (ms)", xlabel="offered rate (req/s)", xscale="log")
    ax[1].set(title="TPOT (ms)", xlabel="offered rate (req/s)", xscale="log")
    ax[2].plot(rate, [j["request_throughput"] for j in rows], marker="o", label="completed req/s")
    ax[2].plot(rate, [j["goodput"] for j in rows], marker="s",
               label="goodput (TTFT<=%gs, TPOT<=%gs)" % (rows[0]["slo"]["ttft_seconds"],
                                                         rows[0]["slo"]["tpot_seconds"]))
    ax[2].set(title="throughput", xlabel="offered rate (req/s)", xscale="log")
    for a in ax:
        a.set_xticks(rate)
        a.set_xticklabels([("%g" % r) for r in rate])
        a.minorticks_off()
        a.grid(True, alpha=0.3)
        a.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=90)


if __name__ == "__main__":
    main()
