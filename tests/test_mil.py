"""Attention MIL learns "the bag holds a positive instance" and its attention finds the positives."""

import numpy as np
import pytest
import torch
from torch import nn

from haven.learn.mil import AttentionMIL, pad_bags, train_mil

F = 16


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: on a busy 2-core machine a second thread costs 20x (thread hand-offs)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make_bags(n_bags: int, seed: int):
    """Bags of 8-24 Gaussian instances; a positive bag has 1-3 instances shifted along one direction."""
    rng = np.random.default_rng(seed)
    direction = np.zeros(F, np.float32)
    direction[:4] = 2.0
    bags, labels, positives = [], [], []
    for i in range(n_bags):
        n = int(rng.integers(8, 25))
        x = rng.normal(0, 1, (n, F)).astype(np.float32)
        pos = np.zeros(n, bool)
        if i % 2:
            pos[rng.choice(n, size=int(rng.integers(1, 4)), replace=False)] = True
            x[pos] += direction
        bags.append(x)
        labels.append(int(pos.any()))
        positives.append(pos)
    return bags, np.array(labels), positives


def test_attention_mil_learns_and_attends_to_positive_instances():
    bags, y, _ = make_bags(200, seed=0)
    model = train_mil(bags, y, nn.CrossEntropyLoss(), epochs=20, lr=1e-2, seed=0, out=2, batch_size=32)
    test, y_test, positives = make_bags(100, seed=1)
    with torch.no_grad():
        x, mask = pad_bags(test)
        logits, attn = model(x, mask)
    acc = float((logits.argmax(1).numpy() == y_test).mean())
    assert acc > 0.9, acc
    # in each positive bag, the attention ranks positives above negatives (AUC; ties count a half, so
    # uniform attention scores 0.5) and the top-attended instance is a positive one
    tops, aucs = [], []
    for i, pos in enumerate(positives):
        if pos.any():
            a = attn[i, : len(pos)].numpy()
            tops.append(pos[int(a.argmax())])
            diff = a[pos][:, None] - a[~pos][None, :]
            aucs.append(float((diff > 0).mean() + 0.5 * (diff == 0).mean()))
    assert np.mean(tops) > 0.9 and np.mean(aucs) > 0.9, (np.mean(tops), np.mean(aucs))


def test_training_is_deterministic_for_a_seed():
    bags, y, _ = make_bags(20, seed=2)
    a = train_mil(bags, y, nn.CrossEntropyLoss(), epochs=2, seed=5, out=2)
    b = train_mil(bags, y, nn.CrossEntropyLoss(), epochs=2, seed=5, out=2)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_padding_gets_zero_attention_and_leaves_the_logits_unchanged():
    torch.manual_seed(0)
    model = AttentionMIL(F, 3).eval()
    short, long = torch.randn(5, F), torch.randn(9, F)
    x, mask = pad_bags([short.numpy(), long.numpy()])
    x[0, 5:] = 100.0  # whatever the padding holds
    with torch.no_grad():
        logits, attn = model(x, mask)
        alone, attn_alone = model(short)
    assert torch.all(attn[0, 5:] == 0) and torch.allclose(attn[0].sum(), torch.tensor(1.0))
    torch.testing.assert_close(logits[0], alone[0])
    torch.testing.assert_close(attn[0, :5], attn_alone[0])
    assert logits.shape == (2, 3) and attn.shape == (2, 9)


def test_multilabel_targets_and_an_all_padding_bag():
    bags, y, _ = make_bags(16, seed=3)
    targets = np.stack([y, 1 - y], 1).astype(np.float32)
    model = train_mil(bags, targets, nn.BCEWithLogitsLoss(), epochs=1, seed=0)
    assert model.head.out_features == 2
    with torch.no_grad():
        logits, attn = model(torch.zeros(1, 4, F), torch.zeros(1, 4, dtype=torch.bool))
    assert torch.isfinite(logits).all() and torch.all(attn == 0)
