import os
import sys

# Let tests import their shared helpers (``_dense``) and the package from a clean checkout.
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))
