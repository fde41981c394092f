"""HetComp (Kang et al., "Distillation from Heterogeneous Models for Top-K Recommendation", WWW 2023).

Follows the official code's algorithm as written down in HETCOMP_SPEC §4; see ``HetComp``.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from hetcomp.distill.base import Distiller
from hetcomp.distill.dkc import DynamicKnowledgeConstruction, ensemble_topk, factorized_top_unobserved
from hetcomp.distill.losses import Workspace, factorized_rest_log_mass, overall_loss, rank_loss, rest_log_mass
from hetcomp.errors import HetCompError
from hetcomp.evaluation import top_unobserved
from hetcomp.registry import METHODS

log = logging.getLogger(__name__)


@METHODS.register("hetcomp")
class HetComp(Distiller):
    """HetComp: dynamic knowledge construction + adaptive knowledge transfer, KD loss only.

    **Knowledge.** ``idx[x, u]`` selects a checkpoint of teacher ``x`` for user ``u``; it starts at
    0 for every pair (the initial knowledge is the ensemble of every teacher's first checkpoint).
    The unobserved target list ``T_u`` is the top-``top_k`` (100) of the rank-importance ensemble
    (``hetcomp.knowledge.combine_rankings``) of the selected lists. The observed list ``P_u`` is
    the first ``n_observed`` (10) columns of ``knowledge.observed`` (the user's training items
    ranked by the final ensemble) and is fixed for the whole run.

    **Training.** Each BPR batch of ``batch_size`` (1,024) training interactions is reduced to its
    unique users ``B`` (``torch.unique``); the BPR loss itself is not used (as in the official
    code, the only training signal is KD). For ``B`` the student's scores over all items, clamped to
    ``[-score_clamp, score_clamp]`` ([-40, 40]), give

    - phase 1: ``overall_weight`` (0.01) x ``L_overall`` (``losses.overall_loss``), every item of
      ``[P_u, T_u]`` against the rest mass ``Z_u(T_u)``;
    - phase 2: ``rank_weight`` (0.005) x ``L_rank`` (``losses.rank_loss``) with
      ``rank_prefixes`` (50, 10).

    Losses are summed over users and items. Training items never enter a rest mass.

    **DKC** (``hetcomp.distill.dkc``) runs after epochs ``p, 2p, ...`` (``dkc_period`` p = 10)
    while in phase 1, on the student's top-``dkc_depth`` (50) non-training ranking; ``T_u`` is then
    rebuilt for the users whose selection moved, ``v_bar[x] = round(mean_u idx[x, u], 2)``, and
    phase 2 starts (from the next epoch) once ``sum_x v_bar[x] >= T * (C - 1)`` (the official
    ``18 = 6 x 3`` for 6 teachers with 4 checkpoints).

    **Choices the spec leaves open** (also in ``config/methods/hetcomp.yaml``):

    - observed-list padding: ``knowledge.observed`` rows are padded with ``-1`` by
      ``build-ensemble``; padded entries are masked out (no loss term, no mass) in both phases;
    - the DKC ratio divides by ``max(d_next, dkc_eps)`` (1e-12; the official code has no guard),
      so ``d_next = 0`` advances the pair;
    - scores are clamped to ``[-40, 40]`` as in the official code (the clamp's gradient is zero
      outside), but the losses are computed in log space (no exp-sum then log); the official
      ``1e-5`` floor on each log argument is kept (``log_floor``, null disables it);
    - ``rank_prefixes`` generalises the official ``1/2 [PL(T[:50]) + PL(T[:10])]`` to the mean over
      the prefixes; the observed list competes with the rest of the first prefix;
    - the DKC's student ranking is computed afresh after the epoch (the official code reuses the
      ranking of the evaluation at the same epoch: the same model state when ``eval_every`` and
      ``dkc_period`` agree);
    - ``T_u`` ties (items with equal ensemble score) are ordered by item id
      (``dkc.ensemble_topk``; ``combine_rankings`` leaves them to ``torch.topk``), and
      ``v_bar`` is rounded with ``numpy.round``.

    ``method_state`` holds the final selection (counts per checkpoint and mean index per teacher),
    the phase, the switch epoch and the DKC epochs; the student itself ends in its best state.
    """

    defaults = {
        "top_k": 100,
        "n_observed": 10,
        "rank_prefixes": [50, 10],
        "overall_weight": 0.01,
        "rank_weight": 0.005,
        "alpha": 1.05,
        "alpha_decay": 0.995,
        "dkc_period": 10,
        "dkc_depth": 50,
        "dkc_eps": 1e-12,
        "score_clamp": 40.0,
        "log_floor": 1e-5,
        "floor_on": "denominator",
    }

    def __init__(self, split, knowledge, student, config, device):
        super().__init__(split, knowledge, student, config, device)
        if knowledge is None:
            raise HetCompError("hetcomp distils teacher knowledge: give --ensemble DIR")
        cfg = {**self.defaults, **(config or {})}
        self.cfg = cfg
        self.device = torch.device(device)
        n_teachers, n_checkpoints, n_users, depth = knowledge.trajectories.shape
        if n_users != split.n_users or knowledge.n_items != split.n_items:
            raise HetCompError(
                f"ensemble has {n_users} users x {knowledge.n_items} items but the split has "
                f"{split.n_users} x {split.n_items}: built from another split?")
        self.top_k = int(cfg["top_k"])
        if not 1 <= self.top_k <= split.n_items:
            raise HetCompError(f"hetcomp: top_k must be in [1, {split.n_items}], got {self.top_k}")
        self.prefixes = [int(m) for m in cfg["rank_prefixes"]]
        if not self.prefixes or any(m < 1 for m in self.prefixes):
            raise HetCompError(f"hetcomp: rank_prefixes must be positive lengths, got {cfg['rank_prefixes']}")
        self.period = int(cfg["dkc_period"])
        if self.period < 1:
            raise HetCompError("hetcomp: dkc_period must be >= 1")
        self.clamp = None if cfg["score_clamp"] is None else float(cfg["score_clamp"])
        self.log_floor = None if cfg["log_floor"] is None else float(cfg["log_floor"])
        self.floor_on = str(cfg["floor_on"])
        if self.floor_on not in ("denominator", "ratio"):
            raise HetCompError(f"hetcomp: floor_on must be 'denominator' or 'ratio', got {self.floor_on!r}")
        self.weights = {"overall": float(cfg["overall_weight"]), "rank": float(cfg["rank_weight"])}

        self.dkc = DynamicKnowledgeConstruction(
            knowledge.trajectories, depth=int(cfg["dkc_depth"]), alpha=float(cfg["alpha"]),
            decay=float(cfg["alpha_decay"]), period=self.period, eps=float(cfg["dkc_eps"]))
        self.targets = self._ensemble(np.arange(n_users)).to(self.device)              # [U, K]
        n_obs = int(cfg["n_observed"])
        observed = np.full((n_users, n_obs), -1, dtype=np.int64)
        take = min(n_obs, knowledge.observed.shape[1])
        observed[:, :take] = knowledge.observed[:, :take]
        self.observed = torch.from_numpy(observed).to(self.device)                     # [U, L], -1 padded
        train = split.train.tocsr()
        self.train_indptr = torch.from_numpy(train.indptr.astype(np.int64)).to(self.device)
        self.train_indices = torch.from_numpy(train.indices.astype(np.int64)).to(self.device)
        owners = torch.repeat_interleave(torch.arange(n_users, device=self.device), self.train_indptr.diff())
        self.train_flat = owners * split.n_items + self.train_indices                  # CSR order
        self.factorized = hasattr(student, "user_emb") and hasattr(student, "item_emb")
        self.workspace = Workspace()

        self.phase = 1
        self.switch_epoch: int | None = None
        self.dkc_epochs: list[int] = []
        self.dkc_seconds: list[float] = []
        self._evaluated = False

    # -- knowledge ---------------------------------------------------------------------------
    def _ensemble(self, users: np.ndarray) -> torch.Tensor:
        """Top-``top_k`` of the ensemble of the currently selected lists, for ``users`` (int64).

        ``knowledge.selected_lists(idx)`` restricted to ``users``, ranked like
        ``hetcomp.knowledge.combine_rankings`` (``dkc.ensemble_topk``: same scores, candidates only).
        """
        knowledge = self.knowledge
        idx = self.dkc.idx.numpy()[:, users]
        lists = np.stack([knowledge.trajectories[t, idx[t], users] for t in range(knowledge.n_teachers)])
        return ensemble_topk(lists, knowledge.n_items, self.top_k, knowledge.temperature)

    def _train_entries(self, users: torch.Tensor) -> torch.Tensor:
        """Flat indices ``row * n_items + item`` of the training items of ``users`` (row = position)."""
        starts = self.train_indptr[users]
        counts = self.train_indptr[users + 1] - starts
        total = int(counts.sum())
        rows = torch.repeat_interleave(torch.arange(len(users), device=users.device), counts,
                                       output_size=total)
        offsets = torch.arange(total, device=users.device) - torch.repeat_interleave(
            torch.cumsum(counts, 0) - counts, counts, output_size=total)
        cols = self.train_indices[starts[rows] + offsets]
        return rows * self.split.n_items + cols

    # -- training ----------------------------------------------------------------------------
    def loss_terms(self, batch) -> dict[str, torch.Tensor]:
        users = torch.unique(batch[0])
        n_items = self.split.n_items
        targets = self.targets[users]                                  # [B, K]
        observed = self.observed[users]                                # [B, L]
        observed_mask = observed >= 0
        rows = torch.arange(len(users), device=users.device).unsqueeze(1)
        # both ordered by row, as factorized_rest_log_mass needs
        exclude = [self._train_entries(users), (rows * n_items + targets).flatten()]
        if self.factorized:
            user_vectors = self.student.user_emb(users)
            item_table = self.student.item_emb.weight
            log_rest = factorized_rest_log_mass(user_vectors, item_table, exclude, self.clamp, self.workspace)
            items = torch.cat([observed.clamp(min=0), targets], 1)
            scores = torch.einsum("bd,bkd->bk", user_vectors, item_table[items])
            if self.clamp is not None:
                scores = scores.clamp(-self.clamp, self.clamp)
        else:  # any other student: the full score matrix through autograd
            full = self.student.score(users)
            if self.clamp is not None:
                full = full.clamp(-self.clamp, self.clamp)
            log_rest = rest_log_mass(full, torch.cat(exclude))
            scores = full.gather(1, torch.cat([observed.clamp(min=0), targets], 1))
        n_obs = observed.shape[1]
        if self.phase == 1:
            mask = torch.cat([observed_mask, torch.ones_like(targets, dtype=torch.bool)], 1)
            loss = overall_loss(scores, mask, log_rest, self.log_floor, self.floor_on)
            return {"overall": self.weights["overall"] * loss}
        loss = rank_loss(scores[:, :n_obs], observed_mask, scores[:, n_obs:], log_rest, self.prefixes,
                         self.log_floor)
        return {"rank": self.weights["rank"] * loss}

    def on_evaluation(self, epoch: int) -> None:
        self._evaluated = True

    def after_epoch(self, epoch: int) -> dict:
        trained_phase = self.phase
        record: dict = {}
        if self.phase == 1 and epoch >= self.period and epoch % self.period == 0:
            record["dkc"] = self.run_dkc(epoch)
        if self._evaluated or record:
            self._evaluated = False
            record["phase"] = trained_phase
            record["selection"] = self.selection_means()
            if self.switch_epoch == epoch:
                record["switched_to_phase2"] = True
        return record

    @torch.no_grad()
    def run_dkc(self, epoch: int) -> dict:
        """One DKC call: update the selection, rebuild the targets that moved, maybe switch phase."""
        started = time.perf_counter()
        was_training = self.student.training
        self.student.train(False)
        try:
            if self.factorized:
                student_top = factorized_top_unobserved(
                    self.student.user_emb.weight, self.student.item_emb.weight, self.train_indptr,
                    self.train_flat, self.dkc.depth).cpu()
            else:
                student_top = torch.from_numpy(top_unobserved(
                    self.student.score, self.split.train, self.dkc.depth, device=self.device))
        finally:
            self.student.train(was_training)
        first = self.dkc.last_d is None
        advanced, d = self.dkc.step(epoch, student_top)
        moved = np.flatnonzero(advanced.any(0).numpy())
        if len(moved):
            self.targets[torch.from_numpy(moved).to(self.device)] = self._ensemble(moved).to(self.device)
        v_bar = np.round(self.dkc.mean_selection(), 2)
        if v_bar.sum() >= self.dkc.n_teachers * self.dkc.last:
            self.phase = 2
            self.switch_epoch = epoch
            log.info("hetcomp: switching to the ranking loss after epoch %d", epoch)
        self.dkc_epochs.append(epoch)
        seconds = time.perf_counter() - started
        self.dkc_seconds.append(seconds)
        teachers = self.knowledge.teachers
        return {
            "first_call": first,
            "advanced": round(float(advanced.to(torch.float64).mean()), 4),
            "users_rebuilt": int(len(moved)),
            "threshold": round(self.dkc.threshold(epoch), 6),
            "discrepancy": {name: [round(float(v), 4) for v in d[t].mean(1)] for t, name in enumerate(teachers)},
            "seconds": round(seconds, 3),
        }

    def selection_means(self) -> dict[str, float]:
        """Mean selected checkpoint index (0 .. C-1) per teacher."""
        return {name: round(float(v), 4) for name, v in zip(self.knowledge.teachers, self.dkc.mean_selection())}

    def method_state(self) -> dict:
        counts = self.dkc.counts()
        return {
            "teachers": list(self.knowledge.teachers),
            "n_checkpoints": self.dkc.n_checkpoints,
            "selection_mean": self.selection_means(),
            "selection_counts": {name: counts[t].tolist() for t, name in enumerate(self.knowledge.teachers)},
            "phase": self.phase,
            "switch_epoch": self.switch_epoch,
            "dkc_epochs": self.dkc_epochs,
            "dkc_seconds_mean": round(float(np.mean(self.dkc_seconds)), 3) if self.dkc_seconds else None,
            "config": self.cfg,
        }
