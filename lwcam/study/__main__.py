"""``python -m lwcam.study``: the study's command line (:mod:`lwcam.study.cli`)."""

import sys

from .cli import main

sys.exit(main())
