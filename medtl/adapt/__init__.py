"""Transfer: fine-tuning strategies (and, later, domain-adaptation losses)."""

from medtl.adapt.strategies import STRATEGIES, FullFineTuning, LinearProbe, make_strategy

__all__ = ["STRATEGIES", "FullFineTuning", "LinearProbe", "make_strategy"]
