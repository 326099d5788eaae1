"""Old import path of ``ngguard.judges.models`` (the HF-checkpoint judges), kept so existing code
keeps working: this name is the same module object, so attributes set on either are seen by both."""
import warnings

warnings.warn("ngguard.judge_models is deprecated and goes in the next release: import ngguard.judges.models", DeprecationWarning,
              stacklevel=2)

import sys

from ngguard.judges import models as _models

sys.modules[__name__] = _models
