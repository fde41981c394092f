"""Per-user item sampling for the KD baselines, without ``[batch, n_items]`` matrices.

``ItemSampler.uniform_outside`` draws each user's negatives ("uninteresting" items) uniformly
without replacement from the items that are neither the user's training items nor on a given
list. It draws candidate ids uniformly from the catalogue, rejects training items (one
``searchsorted`` against the sorted ``user * n_items + item`` keys of the training matrix),
listed items (a batched ``searchsorted`` against each row's sorted list) and repeats, and keeps the
first ``n`` survivors in draw order: the first ``n`` distinct allowed items of an i.i.d. uniform
sequence are a uniform sample without replacement. A row that comes up short is redrawn from
scratch (the event is symmetric in the allowed items, so the sample stays uniform); rows still
short after a few rounds (users who own a large share of the catalogue) are drawn exactly from
their own allowed set, which costs ``n_items`` per such row only.

``ItemSampler.by_rank`` draws ``n`` distinct entries of a ranked list with successive
probabilities proportional to ``exp(-rank / temperature)`` (Plackett-Luce sampling without
replacement, realised as a Gumbel top-k over the list, which is short).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from hetcomp.errors import HetCompError

#: Rejection rounds before the short rows are drawn exactly from their allowed sets.
REJECTION_ROUNDS = 3


class ItemSampler:
    """Draws negative / "uninteresting" items per user, seeded by the caller's ``torch.Generator``."""

    def __init__(self, train: sp.csr_matrix, device: torch.device):
        train = sp.csr_matrix(train, copy=True)
        train.sum_duplicates()
        train.sort_indices()
        self.device = torch.device(device)
        self.n_users, self.n_items = train.shape
        indptr = torch.from_numpy(train.indptr.astype(np.int64))
        indices = torch.from_numpy(train.indices.astype(np.int64))
        rows = torch.repeat_interleave(torch.arange(self.n_users), indptr[1:] - indptr[:-1])
        #: ``user * n_items + item`` of every training interaction, ascending
        self.train_keys = (rows * self.n_items + indices).to(self.device)
        self.train_counts = (indptr[1:] - indptr[:-1]).to(self.device)

    # -- membership ------------------------------------------------------------------------
    def is_training(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        """Boolean ``[B, C]``: whether ``items[b, c]`` is a training item of ``users[b]``."""
        keys = users.unsqueeze(1) * self.n_items + items
        if self.train_keys.numel() == 0:
            return torch.zeros_like(keys, dtype=torch.bool)
        pos = torch.searchsorted(self.train_keys, keys.flatten()).clamp_(max=self.train_keys.numel() - 1)
        return (self.train_keys[pos] == keys.flatten()).view_as(keys)

    def _sorted_listed(self, listed: torch.Tensor, listed_valid: torch.Tensor) -> torch.Tensor:
        """Each row's valid listed ids ascending, padded with ``n_items`` (matches no item)."""
        return torch.sort(torch.where(listed_valid, listed, torch.full_like(listed, self.n_items)), dim=1).values

    @staticmethod
    def _is_listed(sorted_listed: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        if sorted_listed.shape[1] == 0:
            return torch.zeros_like(items, dtype=torch.bool)
        pos = torch.searchsorted(sorted_listed, items).clamp_(max=sorted_listed.shape[1] - 1)
        return sorted_listed.gather(1, pos) == items

    # -- uniform negatives -----------------------------------------------------------------
    def uniform_outside(self, users: torch.Tensor, listed: torch.Tensor, listed_valid: torch.Tensor,
                        n: int, generator: torch.Generator) -> torch.Tensor:
        """``n`` items per user, ``[B, n]``, uniform without replacement over the user's items that
        are neither training items nor valid ``listed`` items. A user with fewer than ``n`` such
        items gets all of them, in random order, repeated cyclically; one with none is an error."""
        users = users.to(self.device)
        listed = listed.to(self.device).reshape(len(users), -1)
        listed_valid = listed_valid.to(self.device).reshape(listed.shape)
        out = torch.empty(len(users), n, dtype=torch.long, device=self.device)
        if n <= 0 or len(users) == 0:
            return out[:, :max(n, 0)]
        sorted_listed = self._sorted_listed(listed, listed_valid)
        todo = torch.arange(len(users), device=self.device)
        for _ in range(REJECTION_ROUNDS):
            if todo.numel() == 0:
                return out
            drawn, complete = self._reject(users[todo], sorted_listed[todo], n, generator)
            out[todo[complete]] = drawn[complete]
            todo = todo[~complete]
        if todo.numel():
            out[todo] = self._exact(users[todo], sorted_listed[todo], n, generator)
        return out

    def _reject(self, users, sorted_listed, n, generator):
        """One rejection round: ``(items [B, n], complete [B])``."""
        n_candidates = 2 * n + 16
        cand = torch.randint(self.n_items, (len(users), n_candidates), generator=generator,
                             device=self.device)
        ok = ~(self.is_training(users, cand) | self._is_listed(sorted_listed, cand))
        ordered, order = torch.sort(cand, dim=1, stable=True)     # repeats: keep the earliest draw
        repeat = torch.zeros_like(ok)
        repeat[:, 1:] = ordered[:, 1:] == ordered[:, :-1]
        ok &= ~torch.zeros_like(ok).scatter_(1, order, repeat)
        # surviving draws first, each group in draw order (sort on a 0/1 key is stable)
        keep = torch.sort((~ok).to(torch.uint8), dim=1, stable=True).indices[:, :n]
        return cand.gather(1, keep), ok.sum(1) >= n

    def _exact(self, users, sorted_listed, n, generator):
        """Uniform draw from each row's explicit allowed set (a few rows only)."""
        allowed = torch.ones(len(users), self.n_items + 1, dtype=torch.bool, device=self.device)
        counts = self.train_counts[users]
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(len(users), device=self.device), counts,
                                       output_size=total)
        offsets = torch.arange(total, device=self.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts, output_size=total)
        starts = torch.cumsum(self.train_counts, 0) - self.train_counts
        allowed[rows, self.train_keys[starts[users][rows] + offsets] % self.n_items] = False
        allowed.scatter_(1, sorted_listed, False)
        allowed = allowed[:, :self.n_items]
        counts = allowed.sum(1)
        if bool((counts == 0).any()):
            user = int(users[counts == 0][0])
            raise HetCompError(f"user {user} has no item outside its training items and its list")
        keys = torch.rand(allowed.shape, generator=generator, device=self.device, dtype=torch.float64)
        ranked = torch.sort(keys.masked_fill_(~allowed, 2.0), dim=1).indices     # allowed first
        slots = torch.arange(n, device=self.device).unsqueeze(0) % counts.unsqueeze(1)
        return ranked.gather(1, slots)

    # -- rank-based draws ------------------------------------------------------------------
    @staticmethod
    def by_rank(ranked: torch.Tensor, n: int, temperature: float,
                generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` distinct entries per row of ``ranked [B, R]`` (best first, ``-1`` padded), drawn
        one after another with probability proportional to ``exp(-rank / temperature)`` among the
        entries left (rank = 0-based position). Returns ``(items [B, n], valid [B, n])`` in list
        order; slots past a row's number of real entries hold ``-1`` and are not valid."""
        if temperature <= 0:
            raise HetCompError(f"by_rank: temperature must be > 0, got {temperature}")
        batch, length = ranked.shape
        n = min(n, length)
        position = torch.arange(length, device=ranked.device, dtype=torch.float64)
        uniform = torch.rand((batch, length), generator=generator, device=ranked.device,
                             dtype=torch.float64).clamp_(min=1e-300)
        keys = -position / float(temperature) - torch.log(-torch.log(uniform))
        keys = keys.masked_fill(ranked < 0, -torch.inf)
        top = torch.topk(keys, n, dim=1)
        valid = torch.isfinite(top.values)
        positions = torch.sort(top.indices.masked_fill(~valid, length), dim=1).values
        valid = positions < length
        items = ranked.gather(1, positions.clamp(max=max(length - 1, 0)))
        return items.masked_fill(~valid, -1), valid
