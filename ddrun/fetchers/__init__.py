"""Network fetchers (``conf/fetcher/``): ``fetch(it) -> Fetched`` (contract: ``ddrun.contracts.Fetcher``)."""

from ddrun.fetchers.basic import FixedFetcher, RandomFetcher

__all__ = ["RandomFetcher", "FixedFetcher"]
