"""Entry point shared by every service's ``__main__``: settings -> processor -> run."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from services.runtime.app import Processor, StreamApp
from services.runtime.metrics import RuntimeMetrics
from services.runtime.settings import ConfigError, Settings, load
from services.runtime.spec import SpecError


def main(name: str, build: Callable[[Settings, RuntimeMetrics], Processor]) -> int:
    """Load settings from the environment, build the processor, run until SIGTERM/SIGINT.

    Bad configuration or a bad spec exits with status 2 and a message naming the field."""
    try:
        settings = load()
        logging.basicConfig(level=settings.service.log_level,
                            format=f"%(asctime)s {name} %(levelname)s %(name)s: %(message)s")
        metrics = RuntimeMetrics(name)
        processor = build(settings, metrics)
    except (ConfigError, SpecError, ValueError) as exc:
        print(f"{name}: configuration error: {exc}", file=sys.stderr)
        return 2
    app = StreamApp(settings, processor, metrics)
    app.install_signal_handlers()
    http = app.start_http()
    logging.getLogger(name).info("%s metrics at %s/metrics", name, http.url)
    app.run()
    return 0
