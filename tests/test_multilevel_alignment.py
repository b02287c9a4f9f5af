"""Multi-level alignment terms (region <-> sentence, sentence <-> patch, auxiliary segmentation) on tiny tensors, and
one backward through the CT-specialised encoder and all three."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ctclip_contract.anatomy_lexicon import region_sentence_mask
from custom_nets.ct_specialised import CTSpecialisedEncoder
from custom_nets.losses import clip_loss
from custom_nets.multilevel_alignment import (PatchSegmentationLoss, RegionSentenceLoss, SentencePatchLoss,
                                              multi_positive_infonce, region_texts)


def unit(*shape, seed=0):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


def test_multi_positive_infonce_is_clip_without_duplicates_and_counts_duplicates_as_positives():
    logits = torch.randn(5, 5, generator=torch.Generator().manual_seed(0)) * 3
    eye = torch.eye(5, dtype=torch.bool)
    torch.testing.assert_close(multi_positive_infonce(logits, eye), clip_loss(logits))
    pos = eye.clone()
    pos[0, 1] = pos[1, 0] = True
    by_hand = (torch.logsumexp(logits[0], 0) - torch.logsumexp(logits[0, :2], 0))
    rows = torch.stack([by_hand] + [torch.logsumexp(logits[i], 0) - logits[i, i] for i in range(1, 5)])
    rows[1] = torch.logsumexp(logits[1], 0) - torch.logsumexp(logits[1, :2], 0)
    cols = torch.stack([torch.logsumexp(logits[:, j], 0) - torch.logsumexp(logits[pos[:, j], j], 0) for j in range(5)])
    torch.testing.assert_close(multi_positive_infonce(logits, pos), (rows.mean() + cols.mean()) / 2)


def test_region_texts_and_masked_regions():
    sentences = unit(2, 3, 8, seed=1)
    sentence_mask = torch.tensor([[True, True, False], [True, True, True]])
    mentions = torch.zeros(2, 3, 4, dtype=torch.bool)
    mentions[0, 0, 0] = mentions[0, 1, 0] = True  # region 0 of volume 0: two sentences
    mentions[0, 2, 1] = True  # a padding row: region 1 of volume 0 has no sentence
    mentions[1, 2, 2] = True
    texts, has_text = region_texts(sentences, sentence_mask, mentions)
    assert has_text.tolist() == [[True, False, False, False], [False, False, True, False]]
    torch.testing.assert_close(texts[0, 0], F.normalize(sentences[0, 0] + sentences[0, 1], dim=0))

    loss = RegionSentenceLoss()
    regions = unit(2, 4, 8, seed=2).requires_grad_(True)
    region_mask = torch.ones(2, 4, dtype=torch.bool)
    value = loss(regions, region_mask, sentences, sentence_mask, mentions, 10.0)
    # the two pairs left are a 2 x 2 CLIP problem
    images = torch.stack([regions[0, 0], regions[1, 2]])
    targets = torch.stack([texts[0, 0], texts[1, 2]])
    torch.testing.assert_close(value, clip_loss(images @ targets.t() * 10.0))
    value.backward()
    assert regions.grad[0, 0].abs().sum() > 0 and regions.grad[0, 1].abs().sum() == 0  # no sentence: no loss
    # a region absent from the mask leaves the loss, even with a sentence
    region_mask[1, 2] = False
    assert loss(regions, region_mask, sentences, sentence_mask, mentions, 10.0) == 0


def test_region_loss_with_the_lexicon_and_repeated_sentences():
    reports = [["No pleural effusion was observed.", "There is mild pericardial effusion."],
               ["No pleural effusion was observed.", "Emphysematous areas are noted in the right upper lobe."]]
    mentions = torch.tensor([region_sentence_mask(r) for r in reports])  # (B, S, R)
    assert mentions.shape == (2, 2, 20)
    text = {s: unit(8, seed=10 + i) for i, s in enumerate(sorted({s for r in reports for s in r}))}
    sentences = torch.stack([torch.stack([text[s] for s in r]) for r in reports])
    regions = unit(2, 20, 8, seed=3)
    loss = RegionSentenceLoss()(regions, torch.ones(2, 20, dtype=torch.bool), sentences,
                                torch.ones(2, 2, dtype=torch.bool), mentions, 5.0)
    # four pairs: pleural space of both volumes (the same sentence: positives of each other), heart, upper right lobe
    valid = mentions.any(1)
    images, targets = regions[valid], region_texts(sentences, torch.ones(2, 2, dtype=torch.bool), mentions)[0][valid]
    same = targets @ targets.t() > 0.9999
    assert same.sum() == 4 + 2
    torch.testing.assert_close(loss, multi_positive_infonce(images @ targets.t() * 5.0, same))


def test_sentence_patch_loss():
    torch.manual_seed(0)
    term = SentencePatchLoss(token_dim=12, dim_latent=8)
    tokens = torch.randn(2, 10, 12, requires_grad=True)
    sentences = unit(2, 3, 8, seed=4)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    summaries, weights = term.attend(tokens, sentences)
    assert summaries.shape == (2, 3, 8) and weights.shape == (2, 3, 10)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3))
    value = term(tokens, sentences, mask, 10.0)
    by_hand = multi_positive_infonce(summaries[mask] @ sentences[mask].t() * 10.0, torch.eye(4, dtype=torch.bool))
    torch.testing.assert_close(value, by_hand)
    # padding rows change nothing
    other = sentences.clone()
    other[1, 1:] = unit(2, 8, seed=5)
    torch.testing.assert_close(term(tokens, other, mask, 10.0), value)
    value.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in term.parameters())
    assert tokens.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="do not fit"):
        term(tokens, sentences, mask[:, :2], 10.0)


def test_patch_segmentation_loss():
    fractions = torch.tensor([[[0.7, 0.3, 0.0], [0.0, 0.25, 0.75]]])
    logits = torch.tensor([[[5.0, 0.0, 0.0], [0.0, 0.0, 5.0]]])
    majority = PatchSegmentationLoss()(logits, fractions)
    torch.testing.assert_close(majority, F.cross_entropy(logits[0], torch.tensor([0, 2])))
    soft = PatchSegmentationLoss("soft")(logits, fractions)
    torch.testing.assert_close(soft, -(fractions * logits.log_softmax(-1)).sum(-1).mean())
    assert soft > majority  # the soft target also asks for the minority share
    assert PatchSegmentationLoss()(logits, fractions, volume_mask=torch.tensor([False])) == 0
    with pytest.raises(ValueError, match="target must be one of"):
        PatchSegmentationLoss("hard")


def test_every_head_gets_gradient_from_the_three_levels():
    """The encoder with a mask, the projections a CLIP model would hold, and every term: every parameter of the
    encoder and of the sentence-patch head gets a gradient."""
    torch.manual_seed(0)
    enc = CTSpecialisedEncoder(patch_size=(2, 8, 8), dim=16, depth=2, heads=2, num_regions=20,
                               aux_segmentation=True).train()
    to_latent = torch.nn.Linear(16, 8, bias=False)
    x = torch.rand(2, 1, 8, 16, 16) * 2 - 1
    seg = torch.zeros(2, 1, 8, 16, 16, dtype=torch.long)
    seg[:, :, :4, :, :8], seg[:, :, :4, :, 8:], seg[:, :, 4:] = 3, 5, 10  # upper lobe right / lower right / heart
    reports = [["There is mild pericardial effusion.", "Consolidation is observed in the right upper lobe."],
               ["No pericardial effusion was detected.", "Atelectasis in the right lower lobe."]]
    mentions = torch.tensor([region_sentence_mask(r) for r in reports])
    sentences = unit(2, 2, 8, seed=6)
    smask = torch.ones(2, 2, dtype=torch.bool)
    out = enc.encode_volume(x, seg)
    sentence_term = SentencePatchLoss(16, 8)
    loss = (clip_loss(F.normalize(to_latent(out.embedding), dim=-1) @ sentences.mean(1).t() * 10)
            + RegionSentenceLoss()(F.normalize(to_latent(out.regions), dim=-1), out.region_mask, sentences, smask,
                                   mentions, 10.0)
            + sentence_term(out.tokens, sentences, smask, 10.0)
            + PatchSegmentationLoss()(out.segmentation_logits, out.patch_regions))
    loss.backward()
    missing = [n for n, p in [*enc.named_parameters(), *sentence_term.named_parameters()]
               if p.grad is None or not p.grad.abs().sum() > 0]
    assert missing == []
