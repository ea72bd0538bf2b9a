"""Loss functions as pure functions of tensors: no modules, no config, no distributed state.

Contrastive losses come in two forms: ``*_rows`` scores a block of *rows* (e.g. this rank's images) against all
*columns* (e.g. every rank's texts), and the symmetric loss adds the two directions. With rows = columns this is the
single-process loss; with gathered columns it is the global-negative loss (see ``tbps.distributed``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CMPM_NORMS = ("l2", "sum")


def _identity_targets(row_pids: torch.Tensor, col_pids: torch.Tensor, norm: str = "sum") -> torch.Tensor:
    """y_ij = 1[pid_i = pid_j] normalised per row: ``sum``: q_ij = y_ij / sum_k y_ik (a distribution, SDM);
    ``l2``: q_ij = y_ij / ||y_i||_2 = y_ij / sqrt(#positives of row i) (the official CMPM code of IVT and IRRA)."""
    y = (row_pids[:, None] == col_pids[None, :]).float()
    if norm == "sum":
        return y / y.sum(dim=1, keepdim=True).clamp_min(1.0)
    if norm == "l2":
        return y / y.sum(dim=1, keepdim=True).clamp_min(1.0).sqrt()
    raise ValueError(f"label-row normalisation must be one of {', '.join(CMPM_NORMS)}, got {norm!r}")


def _kl_to_identity(logits: torch.Tensor, q: torch.Tensor, epsilon: float) -> torch.Tensor:
    """(1/N) sum_i sum_j p_ij (log p_ij - log(q_ij + eps)) with p = softmax_j(logits)."""
    log_p = F.log_softmax(logits, dim=1)
    return (log_p.exp() * (log_p - torch.log(q + epsilon))).sum(dim=1).mean()


def sdm_rows(rows: torch.Tensor, cols: torch.Tensor, row_pids: torch.Tensor, col_pids: torch.Tensor,
             logit_scale: torch.Tensor | float, epsilon: float = 1e-8) -> torch.Tensor:
    """One direction of IRRA's similarity distribution matching (rows against columns)."""
    sim = F.normalize(rows, dim=-1) @ F.normalize(cols, dim=-1).t()
    return _kl_to_identity(logit_scale * sim, _identity_targets(row_pids, col_pids), epsilon)


def sdm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
             logit_scale: torch.Tensor | float, epsilon: float = 1e-8) -> torch.Tensor:
    """IRRA's SDM: KL(p || q) image->text plus text->image, each averaged over the batch; features normalised here.

    p_ij = softmax_j(s * cos(v_i, t_j)), q_ij = y_ij / sum_k y_ik, s = logit_scale (= 1 / tau).
    """
    return (sdm_rows(image_feats, text_feats, pids, pids, logit_scale, epsilon)
            + sdm_rows(text_feats, image_feats, pids, pids, logit_scale, epsilon))


def itc_rows(rows: torch.Tensor, cols: torch.Tensor, targets: torch.Tensor,
             logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Cross-entropy of each row against its target column (InfoNCE)."""
    sim = F.normalize(rows, dim=-1) @ F.normalize(cols, dim=-1).t()
    return F.cross_entropy(logit_scale * sim, targets)


def itc_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """CLIP's symmetric InfoNCE with the diagonal as positives: (CE(i->t) + CE(t->i)) / 2."""
    targets = torch.arange(len(image_feats), device=image_feats.device)
    return (itc_rows(image_feats, text_feats, targets, logit_scale)
            + itc_rows(text_feats, image_feats, targets, logit_scale)) / 2


def cmpm_rows(rows: torch.Tensor, cols: torch.Tensor, row_pids: torch.Tensor, col_pids: torch.Tensor,
              epsilon: float = 1e-8, norm: str = "l2") -> torch.Tensor:
    """One direction of CMPM: p = softmax_j(x_i . x̂_j) with only the columns unit-normalised."""
    return _kl_to_identity(rows @ F.normalize(cols, dim=-1).t(), _identity_targets(row_pids, col_pids, norm),
                           epsilon)


def cmpm_loss(image_feats: torch.Tensor, text_feats: torch.Tensor, pids: torch.Tensor,
              epsilon: float = 1e-8, norm: str = "l2") -> torch.Tensor:
    """Cross-modal projection matching (Zhang & Lu 2018): KL(p || q) image->text + text->image,
    sum_i sum_j p_ij (log p_ij - log(q_ij + eps)) / N per direction.

    ``norm="l2"`` (default): q_ij = y_ij / ||y_i||_2, as the official implementations compute it (IVT's
    loss/cmps_loss.py, IRRA's compute_cmpm). q is then not a distribution when a row has several positives.
    ``norm="sum"``: q_ij = y_ij / sum_k y_ik, the paper's "normalized" matching distribution. The two agree when every
    row has exactly one positive."""
    return (cmpm_rows(image_feats, text_feats, pids, pids, epsilon, norm)
            + cmpm_rows(text_feats, image_feats, pids, pids, epsilon, norm))


def id_loss(image_logits: torch.Tensor, text_logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Identity classification with one classifier shared by both modalities: mean of the two cross-entropies."""
    return (F.cross_entropy(image_logits, labels) + F.cross_entropy(text_logits, labels)) / 2


def mlm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on masked positions only (labels -100 elsewhere). logits [B, L, V], labels [B, L]."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def part_commonality(parts: torch.Tensor, pids: torch.Tensor) -> torch.Tensor:
    """How common each sample's part appearance is among *other* identities: c[i, k] in [0, 1].

    c[i, k] = mean over j with pid_j != pid_i of max(0, cos(part_k(i), part_k(j))), from detached features.
    A part that looks like many other people's (plain dark trousers) scores high; a distinctive one scores low.
    """
    p = F.normalize(parts.detach(), dim=-1)  # [B, K, D]
    sim = torch.einsum("ikd,jkd->kij", p, p).clamp_min(0)  # [K, B, B]
    neg = (pids[:, None] != pids[None, :]).float()  # [B, B]
    return ((sim * neg).sum(-1) / neg.sum(-1).clamp_min(1)).t()  # [B, K]


def _ranking_rows(sim: torch.Tensor, pos: torch.Tensor, margins: torch.Tensor) -> torch.Tensor:
    """Hardest-positive / hardest-negative hinge per anchor and part. sim [K, B, B], pos [B, B], margins [B, K]."""
    big = torch.finfo(sim.dtype).max / 4
    hardest_pos = torch.where(pos[None], sim, torch.full_like(sim, big)).amin(-1)  # [K, B]
    hardest_neg = torch.where(~pos[None], sim, torch.full_like(sim, -big)).amax(-1)  # [K, B]
    valid = (~pos).any(-1).to(sim.dtype)  # anchors with at least one negative
    hinge = F.relu(margins.t() + hardest_neg - hardest_pos)  # [K, B]
    # the mean over the valid anchors' rows (0 if there are none), without reading their number back to the host
    return (hinge * valid).sum() / (valid.sum() * hinge.shape[0]).clamp_min(1)


def cmr_loss(image_parts: torch.Tensor, text_parts: torch.Tensor, pids: torch.Tensor, margin: float = 0.2,
             commonality: bool = True) -> torch.Tensor:
    """Commonality-based margin ranking loss over part embeddings (our reading of Park et al.; docs/methods.md).

    For part k and anchor i, the hardest positive must beat the hardest negative by margin m[i, k]:
        L = mean_{i,k} [m[i,k] + max_{j: pid_j != pid_i} s_k(i,j) - min_{j: pid_j = pid_i} s_k(i,j)]_+
    in both directions (image anchors against texts, text anchors against images), s_k = cosine of the k-th parts.
    With ``commonality`` the margin is m[i,k] = margin * (1 - c[i,k]) (``part_commonality`` of the anchor's own
    modality): parts shared by many identities are pushed apart less than distinctive ones. Otherwise m = margin.
    """
    v, t = F.normalize(image_parts, dim=-1), F.normalize(text_parts, dim=-1)
    sim = torch.einsum("ikd,jkd->kij", v, t)  # [K, B_img, B_txt]
    pos = pids[:, None] == pids[None, :]
    if commonality:
        m_img = margin * (1 - part_commonality(image_parts, pids))
        m_txt = margin * (1 - part_commonality(text_parts, pids))
    else:
        m_img = m_txt = torch.full(image_parts.shape[:2], margin, device=image_parts.device, dtype=sim.dtype)
    return _ranking_rows(sim, pos, m_img) + _ranking_rows(sim.transpose(1, 2), pos.t(), m_txt)
