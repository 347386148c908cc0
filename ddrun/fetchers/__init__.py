"""Network fetchers: ``fetch(it) -> nn.Module`` and ``update(net, syn, real, generator) -> nn.Module``."""

from ddrun.fetchers.basic import FixedFetcher, RandomFetcher

__all__ = ["RandomFetcher", "FixedFetcher"]
