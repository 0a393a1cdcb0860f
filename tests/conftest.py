import sys
from pathlib import Path

# Let `tests/checks.py` be imported as `checks` from any test module.
sys.path.insert(0, str(Path(__file__).parent))
