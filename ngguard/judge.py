"""Old import path of the refusal judges, kept so existing code keeps working: everything lives in
``ngguard.judges`` now (``base``, ``rules``, ``spec``); new code imports from there."""
import warnings

warnings.warn("ngguard.judge is deprecated and goes in the next release: import ngguard.judges", DeprecationWarning,
              stacklevel=2)

from ngguard.judges.base import LABELS, REFUSAL_LABELS, Judge, Verdict, _JudgeBase, check_batch  # noqa: F401
from ngguard.judges.rules import *  # noqa: F401,F403
from ngguard.judges.rules import _rules_source, _unquoted  # noqa: F401
from ngguard.judges.spec import JUDGE_KINDS, _read_spec_file, make_judge, parse_judge_spec  # noqa: F401
