"""Old import path of ``ngguard.judges.validate`` (checking a judge against human labels), kept so
existing code keeps working: this name is the same module object."""
import warnings

warnings.warn("ngguard.validate_judge is deprecated and goes in the next release: import ngguard.judges.validate", DeprecationWarning,
              stacklevel=2)

import sys

from ngguard.judges import validate as _validate

sys.modules[__name__] = _validate
