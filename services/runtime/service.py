"""Entry point shared by every service's ``__main__``: settings -> processor -> run."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable

from services.runtime.app import Processor, StreamApp
from services.runtime.http import ServiceHTTP
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import ConfigError, Settings, load
from services.runtime.spec import SpecError


def main(name: str, build: Callable[[Settings, RuntimeMetrics], Processor]) -> int:
    """Load settings from the environment, build the processor, run until SIGTERM/SIGINT.

    Bad configuration or a bad spec exits with status 2 and a message naming the field."""
    try:
        settings = load()
    except ConfigError as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=settings.service.log_level,
                        format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
    metrics = RuntimeMetrics(name)
    holder: dict[str, StreamApp] = {}
    # HTTP first: a standby learner waiting for its lease is alive (healthz) but not ready (readyz)
    svc = settings.service
    http = ServiceHTTP(svc.metrics_host, svc.metrics_port, metrics.exposition,
                       healthy=lambda: "app" not in holder or holder["app"].healthy(),
                       ready=lambda: "app" in holder and holder["app"].ready()).start()
    logging.getLogger(name).info("%s metrics at %s/metrics", name, http.url)
    # evaluated at each scrape, whoever probes /readyz (Kubernetes probes the learner on /healthz)
    metrics.ready.labels(name).set_function(lambda: 1.0 if "app" in holder and holder["app"].ready() else 0.0)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # until the loop takes over
    try:
        processor = build(settings, metrics)
    except (ConfigError, SpecError, ValueError) as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        http.stop()
        return 2
    app = StreamApp(settings, processor, metrics)
    app.http = http
    if hasattr(processor, "routes"):
        http.add_routes(processor.routes())
    holder["app"] = app
    app.install_signal_handlers()
    app.run()
    return 0
