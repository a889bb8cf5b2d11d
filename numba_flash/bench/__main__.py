"""``python -m numba_flash.bench``: see :mod:`numba_flash.bench.cli`."""
import sys

from .cli import main

sys.exit(main())
