import sys

from services.runtime.service import main
from services.scorer.app import build

sys.exit(main("scorer", build))
