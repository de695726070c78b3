import sys

from services.learner.app import build
from services.runtime.service import main

sys.exit(main("learner", build))
