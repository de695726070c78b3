"""Latency at a fixed rate for several service configurations, alternated on one warmed broker.

Run::

    PYTHONPATH=. python -m tests.bench.bench_latency_ab base: linger15:STREAMLEARN_BATCH_LINGER_MS=15 \\
        [--rate 1000] [--seconds 10] [--rounds 2] [--settle-s 240]

Each argument is ``name:VAR=VALUE,VAR=VALUE`` (``name:`` alone = the defaults): settings for every
service of that configuration. One Apache Kafka broker and one Redis serve all runs; the pipeline
first runs at ``--rate`` until the broker's JIT compiler is quiet (see ``bench_pipeline``), then
each round runs every configuration once, in turn, on a fresh stack (new topics, groups, Redis
namespace; the services restarted with that configuration's settings). Configurations measured
minutes apart on a shared machine drift with its load, so they are alternated and compared by
their medians. Prints per run: end-to-end latency, the three hops, CPU per event by process, the
machine's CPU use and the broker's JIT CPU; then the medians per configuration.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
from pathlib import Path
from typing import Any

from tests.bench.bench_pipeline import SERVICES, Bench, latency_on_own_stack, log, settle_broker, start


def line(name: str, r: dict[str, Any]) -> str:
    e, h, cpu = r["end_to_end_ms"], r["hops_ms"], r["cpu_us_per_event"]
    hops = "/".join(f"{h[k]['p50']:.0f}" for k in h), "/".join(f"{h[k]['p99']:.0f}" for k in h)
    return (f"{name:12s} p50 {e['p50']:5.0f} p95 {e['p95']:5.0f} p99 {e['p99']:5.0f} ms | hops p50 {hops[0]} "
            f"p99 {hops[1]} | " + " ".join(f"{k} {v:.0f}" for k, v in cpu.items())
            + f" us/event | machine {r['cpu_utilisation_of_machine']:.0%} | JIT {r['kafka_jit_cpu_s']} s")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("configs", nargs="+", help="name:VAR=VALUE,... (name: alone = defaults)")
    ap.add_argument("--rate", type=float, default=1000.0)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--settle-s", type=float, default=240.0)
    ap.add_argument("--partitions", type=int, default=3)
    args = ap.parse_args(argv)
    configs: dict[str, dict[str, str]] = {}
    for arg in args.configs:
        name, _, rest = arg.partition(":")
        try:
            configs[name] = dict(kv.split("=", 1) for kv in rest.split(",") if kv)
        except ValueError:
            ap.error(f"{arg!r}: expected name:VAR=VALUE,VAR=VALUE")
    tmp = Path(tempfile.mkdtemp(prefix="streamlearn-ab-"))
    bench = Bench(tmp, args.partitions)
    results: dict[str, list[dict[str, Any]]] = {name: [] for name in configs}
    try:
        bench.warm_up()
        stack = bench.stack("settle")
        try:
            pids = start(stack, SERVICES)
            settle_broker(bench, stack, pids, args.rate, args.settle_s)
        finally:
            stack.stop()
        for rnd in range(args.rounds):
            for name, env in configs.items():
                log(f"round {rnd + 1}: {name} {env}")
                results[name].append(r := latency_on_own_stack(bench, "ab", env, args.rate, args.seconds))
                print(line(name, r), flush=True)
    finally:
        bench.close()
        shutil.rmtree(tmp, ignore_errors=True)
    print("medians:")
    for name, rs in results.items():
        def med(f, rs=rs) -> float:
            return statistics.median(f(r) for r in rs)
        print(f"{name:12s} p50 {med(lambda r: r['end_to_end_ms']['p50']):.0f} ms, "
              f"p99 {med(lambda r: r['end_to_end_ms']['p99']):.0f} ms, "
              f"machine {med(lambda r: r['cpu_utilisation_of_machine']):.0%}, "
              f"Kafka {med(lambda r: r['cpu_us_per_event']['kafka']):.0f} us/event")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
