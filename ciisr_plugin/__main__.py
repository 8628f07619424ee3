"""``python -m ciisr_plugin ...`` is the ``basicsr`` command."""
import sys

from .cli import main

sys.exit(main())
