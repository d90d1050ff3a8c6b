"""InfoNCE loss and pooling for LCO-Emb (work in progress: reference paths first)."""
import torch
import torch.nn.functional as F


def infonce(anchor, positive, negative=None, temperature=0.03, backend="auto"):
    """Mean InfoNCE: candidates = cat(positive, negative); label of anchor i is i."""
    candidates = positive if negative is None else torch.cat([positive, negative], dim=0)
    logits = anchor.float() @ candidates.float().t() / temperature
    labels = torch.arange(anchor.shape[0], device=anchor.device)
    return F.cross_entropy(logits, labels)


def pool(hidden, attention_mask, mode="last", normalize=True, backend="auto"):
    """Pool [B, T, D] hidden states to [B, D]: last attended token or masked mean."""
    mask = attention_mask.to(hidden.dtype)
    if mode == "last":
        positions = torch.arange(mask.shape[1], device=mask.device)
        last = (attention_mask.bool() * positions).amax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    else:
        pooled = (hidden * mask.unsqueeze(-1)).sum(1) / mask.sum(1, keepdim=True)
    return F.normalize(pooled, dim=-1, eps=1e-12) if normalize else pooled
