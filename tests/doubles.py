"""Test doubles shared by the test modules (tests/ is on sys.path under pytest)."""

from hetcomp.models.base import Recommender
from hetcomp.models.mf import MF


class ScoreOnly(Recommender):
    """A student seen only through ``score`` (no embeddings): the distillers' generic path."""

    def __init__(self, inner: MF):
        super().__init__(inner.n_users, inner.n_items)
        self.inner = inner

    def epoch_batches(self, epoch, generator):
        return self.inner.epoch_batches(epoch, generator)

    def loss(self, batch):
        return self.inner.loss(batch)

    def score(self, users):
        return self.inner.score(users)
