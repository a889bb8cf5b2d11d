"""Command-line wrapper: ``python scripts/bench.py --help`` is ``python -m numba_flash.bench --help``."""
import pathlib, sys; sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))  # noqa: E401,E702
from numba_flash.bench import main  # noqa: E402
sys.exit(main())
