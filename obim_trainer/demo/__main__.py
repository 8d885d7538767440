"""``python -m obim_trainer.demo``: see :mod:`obim_trainer.demo.cli`."""

import sys

from obim_trainer.demo.cli import main

sys.exit(main())
