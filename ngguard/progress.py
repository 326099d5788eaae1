"""One progress bar for a whole run, with an ETA across its stages, and each stage's time.

``RunProgress.plan`` is given the run's stages and their estimated work (counts of queries, samples
and steps times a rough relative cost, ``COST``); the bar's unit is that work, so its ETA is the
elapsed time scaled by the work left (the costs need only be right relative to each other). A seed's
stage times go into a ``StageClock`` (a dict): setting a stage's time records it and moves the bar
past that stage. The stages' own bars (evaluation, localization, edit) run beneath it.
"""
from __future__ import annotations

from collections import defaultdict

from tqdm import tqdm

# relative cost of one unit of each kind of work (about: seconds x 100 on the organism, 2 CPU threads)
COST = {"query": 0.7, "localize sample-step": 9.0, "edit image-step": 5.0, "other": 100.0}


class RunProgress:
    def __init__(self, desc: str = "run", disable: bool | None = None):
        self.bar = tqdm(total=0, desc=desc, unit="work", bar_format="{l_bar}{bar}| {percentage:3.0f}% [{elapsed}<{remaining}]{postfix}",
                        disable=disable)
        self.left: dict[str, list[float]] = defaultdict(list)   # stage -> planned work, one entry per time it runs
        self.times: dict[str, float] = defaultdict(float)       # stage -> seconds, over all seeds

    def plan(self, stages: dict[str, float], times: int = 1) -> None:
        """Add ``stages`` (name -> work), run ``times`` times (once per seed), to the bar's total."""
        for name, work in stages.items():
            self.left[name] += [work] * times
        self.bar.total += sum(stages.values()) * times
        self.bar.refresh()

    def done(self, name: str, seconds: float) -> None:
        self.times[name] += seconds
        work = self.left[name].pop(0) if self.left.get(name) else 0.0
        self.bar.update(work)
        self.bar.set_postfix_str(f"done: {name} ({seconds:.0f}s)")

    def clock(self) -> "StageClock":
        return StageClock(self)

    def close(self) -> None:
        self.bar.close()


class StageClock(dict):
    """A seed's stage -> seconds; setting an entry also tells the run's progress (``RunProgress.done``)."""

    def __init__(self, progress: RunProgress | None = None):
        super().__init__()
        self.progress = progress

    def __setitem__(self, name: str, seconds: float) -> None:
        super().__setitem__(name, seconds)
        if self.progress is not None:
            self.progress.done(name, seconds)
