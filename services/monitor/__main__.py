import sys

from services.monitor.app import build
from services.runtime.service import main

sys.exit(main("monitor", build))
