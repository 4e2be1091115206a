# The defaults every config starts from; see partialfc/config.py for what each key means.
# A config file only needs the keys it changes, as with arcface_torch's configs/base.py.
from partialfc.config import default_config

config = default_config()
