"""A router whose loss turns NaN after a given number of training forwards (for the NaN-stop test)."""
from routers.transformer import Transformer


class NaNAfter(Transformer):
    def __init__(self, *args, nan_after_steps: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.nan_after_steps = nan_after_steps
        self.training_forwards = 0

    def forward(self, tokens, return_routing=False):
        out = super().forward(tokens, return_routing=return_routing)
        if self.training and not return_routing:
            self.training_forwards += 1
            if self.training_forwards > self.nan_after_steps:
                return out * float("nan")
        return out
