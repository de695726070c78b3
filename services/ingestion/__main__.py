import sys

from services.ingestion.app import build
from services.runtime.service import main

sys.exit(main("ingestion", build))
