"""How many prompt tokens a step may prefill beside running decodes, so that the step, and
with it every running stream's inter-token latency, lasts about a target.

A step's time is modelled as the decode part plus a cost per prompt token: duration = a + b x
prompt tokens, fitted by least squares over the recent steps that decoded (the durations the
core measures: the time each step adds, so overlapped steps count once). The budget is then
(target - a) / b tokens, never less than one chunk (prompts always progress) and never more
than the step's token budget. While the recent steps all prefilled about as much (no spread to
fit a slope from), the last fit holds; before any, budgets alternate between full and half.

The target is fixed (`target_itl_ms`; 100 ms by default with CUDA) or "auto", a multiple of
the fitted decode part: a step that prefills lasts at most `AUTO_RATIO` decode steps.
"""

from __future__ import annotations

from collections import deque

AUTO_RATIO = 3.0  # "auto": a prefilling step lasts at most this many decode steps
_WINDOW = 64  # steps the fit looks at: the load changes, old steps stop counting
_MIN_SPREAD = 0.05  # relative spread of prompt tokens below which no slope is fitted


class PrefillPacer:
    def __init__(self, target_s: float | None, floor: int, ceiling: int) -> None:
        """target_s: seconds a step beside decodes should last; None: AUTO_RATIO x the fitted
        decode part; 0: no pacing. floor: the least budget (one prefill chunk); ceiling: the
        most (the step's token budget)."""
        self.target_s = target_s
        self.floor = min(floor, ceiling)
        self.ceiling = ceiling
        self._steps: deque[tuple[int, float]] = deque(maxlen=_WINDOW)  # (prompt tokens, s)
        self.budget = ceiling  # the budget the last step was given
        self._probe = False
        self._fitted: tuple[float, float] | None = None  # the last (decode s, s per token)

    @property
    def enabled(self) -> bool:
        return self.target_s != 0

    def observe(self, decodes: int, prompt_tokens: int, duration_s: float) -> None:
        """A finished step. Steps without decodes say nothing of the latency decodes see."""
        if self.enabled and decodes > 0 and duration_s > 0:
            self._steps.append((prompt_tokens, duration_s))

    def prompt_budget(self, decodes: int) -> int:
        """Prompt tokens the next step may take beside `decodes` decoding rows."""
        self.budget = self.ceiling
        if not self.enabled or decodes == 0 or not self._steps:
            return self.budget
        decode_s, per_token_s = self._fit()
        if per_token_s is not None:
            self._fitted = (decode_s, per_token_s)
        elif self._fitted is not None:  # steady budgets, or no prefill lately: it still holds
            decode_s = self._fitted[0] if decode_s is None else decode_s
            per_token_s = self._fitted[1]
        if decode_s is None:
            # Every recent step prefilled about as much, and no fit yet: nothing tells the
            # decode part from the prefill. Alternate full and half budgets until the steps do.
            self._probe = not self._probe
            if self._probe:
                self.budget = self._clamp(self.ceiling // 2)
        elif per_token_s is not None:  # (None: no step prefilled yet; the next one tells)
            target = AUTO_RATIO * decode_s if self.target_s is None else self.target_s
            self.budget = self._clamp((target - decode_s) / per_token_s)
        return self.budget

    def _clamp(self, tokens: float) -> int:
        return max(self.floor, min(self.ceiling, int(tokens)))

    def _fit(self) -> tuple[float | None, float | None]:
        """(a, b) of duration = a + b x prompt tokens; a None where the steps cannot tell it,
        b None where no step prefilled."""
        n = len(self._steps)
        mean_x = sum(x for x, _ in self._steps) / n
        mean_y = sum(y for _, y in self._steps) / n
        var_x = sum((x - mean_x) ** 2 for x, _ in self._steps) / n
        if mean_x == 0:  # decodes only: the decode part, and nothing to scale
            return mean_y, None
        if var_x ** 0.5 < _MIN_SPREAD * mean_x:
            return None, None
        cov = sum((x - mean_x) * (y - mean_y) for x, y in self._steps) / n
        slope = cov / var_x
        if slope <= 0:  # noise: prefilling cannot make a step shorter
            return None, None
        return max(0.0, mean_y - slope * mean_x), slope
