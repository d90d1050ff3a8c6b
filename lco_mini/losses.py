"""What one training step computes, for both stages: the batch the processor builds, the loss,
and its backward. train.py's loops call these; tests call them directly.

  generative_inputs / generative_loss   stage 1: next-token cross-entropy on the answer tokens
  embed_inputs / embed_items            stage 2: L2-normalised last-token embeddings
  batch_items / batch_loss              stage 2: one list to embed, InfoNCE across processes
  gradcache                             stage 2 in micro-batches, with every in-batch negative kept

The forward passes run under --precision's autocast (lco_mini/support/precision.py); losses are fp32.
"""
from __future__ import annotations

import torch

from lco_mini import backbone
from lco_mini.support import checkpoint, distributed, media, precision
from lco_mini.infonce import infonce


def generative_inputs(processor, examples, max_text_tokens=media.MAX_TEXT_TOKENS):
    """The processor's batch for (item, target text) examples: token ids, pixels, mel features,
    and labels = the target's token ids (-100 elsewhere: the prompt is not scored)."""
    items, targets = zip(*examples)
    return backbone.build_inputs(processor, list(items), targets=list(targets), max_text_tokens=max_text_tokens)


MEDIA_INPUTS = {"pixel_values", "pixel_values_videos", "input_features"}  # the processor's float inputs


def generative_loss(model, inputs, device, precision_used="fp32") -> torch.Tensor:
    """Next-token cross-entropy on the labelled (target) tokens. The forward runs under
    --precision's autocast (bf16 matmuls where native; a bf16 copy computes in bf16 anyway, with the
    same numbers); the loss is taken in fp32.

    Left padding puts every row's answer at its end, so only the last K positions (K = the
    longest answer) need logits: lm_head and the softmax run on ~12 positions a row, not ~60."""
    inputs = inputs.to(device)
    for key in MEDIA_INPUTS.intersection(inputs.keys()):  # pixels and mel features in the model's dtype
        inputs[key] = inputs[key].to(model.dtype)
    labels = inputs.pop("labels")
    answer = int((labels != -100).sum(dim=1).max())  # K
    decoder = backbone.multimodal_decoder(model)
    with precision.autocast(device, precision_used):
        if decoder is None:  # an architecture whose decoder takes no media: all logits, then the last K
            logits = model(**inputs, use_cache=False).logits[:, -answer - 1:-1].flatten(0, 1)
        else:  # position t predicts token t + 1: the hidden states before each answer token
            hidden = decoder(**inputs, use_cache=False).last_hidden_state[:, -answer - 1:-1]
            # as one [B * K, D] matrix: matmul takes a strided [B, K, D] bf16 slice through expand + bmm,
            # which copies the [vocab, D] weight once per sequence, forward and backward (5 GB for 8
            # sequences of a 3B model: 151,936 x 2048 in bf16); the numbers are the same
            logits = model.lm_head(hidden.flatten(0, 1))
    return torch.nn.functional.cross_entropy(logits.float(), labels[:, -answer:].flatten(), ignore_index=-100)


def embed_inputs(model, inputs, device, precision_used="fp32") -> torch.Tensor:
    """L2-normalised fp32 embeddings of a build_inputs batch, the forward under --precision's autocast."""
    with precision.autocast(device, precision_used):
        return backbone.embed_batch(model, inputs.to(device))


def embed_items(model, processor, items, device, max_text_tokens=media.MAX_TEXT_TOKENS,
                precision_used="fp32") -> torch.Tensor:
    inputs = backbone.build_inputs(processor, items, max_text_tokens=max_text_tokens)
    return embed_inputs(model, inputs, device, precision_used)


def batch_items(triples, hard_negatives: bool = True) -> list:
    """anchors, then positives, then (unless hard_negatives is off) hard negatives: one list to embed."""
    anchors, positives, negatives = (list(x) for x in zip(*triples))
    return anchors + positives + (negatives if hard_negatives else [])


def batch_loss(embeddings: torch.Tensor, n_pairs: int, temperature: float = 0.03) -> torch.Tensor:
    """InfoNCE of this process's anchors against the candidates of every process (in-batch
    negatives across devices). Multiplied by the number of processes because average_gradients
    divides the summed gradients by it, while this loss is a mean over the local anchors only:
    the product makes the averaged gradient the one-process gradient of the whole batch
    (tests/test_distributed.py checks it)."""
    a, p, n = embeddings[:n_pairs], embeddings[n_pairs:2 * n_pairs], embeddings[2 * n_pairs:]
    a, p = distributed.gather_with_grad(a), distributed.gather_with_grad(p)
    n = distributed.gather_with_grad(n) if len(n) else None
    return infonce(a, p, n, temperature=temperature) * distributed.world_size()


def gradcache(model, processor, triples, device, micro_batch: int, hard_negatives: bool = True,
              temperature: float = 0.03, max_text_tokens=media.MAX_TEXT_TOKENS,
              precision_used: str = "fp32") -> torch.Tensor:
    """Forward and backward of one contrastive batch in micro-batches, with every negative kept.

    GradCache (Gao et al. 2021): (1) embed all items without a graph, in micro-batches;
    (2) compute the loss on the detached embeddings and its gradient w.r.t. them;
    (3) re-run each micro-batch with a graph and back-propagate its slice of that
    gradient. Memory is one micro-batch; the loss is the full-batch loss. Gradient
    accumulation, by contrast, would shrink the candidates per anchor to the micro-batch.
    Returns batch_loss, detached (its .backward() has been done here)."""
    items = batch_items(triples, hard_negatives)
    chunks = [items[i:i + micro_batch] for i in range(0, len(items), micro_batch)]
    states, cached = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(checkpoint.rng_state())  # every device's RNG: step (3) replays the same dropout masks
            cached.append(embed_items(model, processor, chunk, device, max_text_tokens, precision_used))
    embeddings = torch.cat(cached).detach().requires_grad_()
    loss = batch_loss(embeddings, len(triples), temperature)
    loss.backward()
    for chunk, state, grad in zip(chunks, states, embeddings.grad.split([len(c) for c in chunks])):
        checkpoint.set_rng_state(state)
        embed_items(model, processor, chunk, device, max_text_tokens, precision_used).backward(grad)
    return loss.detach()
