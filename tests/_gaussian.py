"""Exact noise predictors of Gaussian mixtures under the VP-SDE (known answers for samplers)."""

import numpy as np
import torch

from scbranch.module import VPSDE, BranchTree


class GaussianMixtureEps:
    """eps(x, t) of each branch: the exact score of the mixture of that branch's classes."""

    def __init__(self, means, covs, tree: BranchTree, sde: VPSDE):
        self.means = torch.as_tensor(np.asarray(means), dtype=torch.float64)
        self.covs = torch.as_tensor(np.asarray(covs), dtype=torch.float64)
        self.tree = tree
        self.sde = sde

    def eps(self, x, t, classes):
        x = x.to(torch.float64)
        t = torch.tensor(float(t), dtype=torch.float64)
        a, s = self.sde.alpha(t), self.sde.sigma(t)
        d = x.shape[1]
        logp, scores = [], []
        for c in classes:
            cov = a**2 * self.covs[c] + s**2 * torch.eye(d, dtype=torch.float64)
            prec = torch.linalg.inv(cov)
            diff = x - a * self.means[c]
            logp.append(-0.5 * (diff @ prec * diff).sum(1) - 0.5 * torch.logdet(cov))
            scores.append(-diff @ prec)
        w = torch.softmax(torch.stack(logp), dim=0)  # (K, n), equal class weights
        score = (w.unsqueeze(-1) * torch.stack(scores)).sum(0)
        return (-s * score).to(torch.float32)

    def __call__(self, x, t, branch, label):
        out = torch.empty_like(x)
        for b in torch.unique(branch).tolist():
            rows = branch == b
            out[rows] = self.eps(x[rows], t, self.tree.branches[b].classes)
        return out
