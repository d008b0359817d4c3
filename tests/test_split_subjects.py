"""sano_jax.datasets.split_subjects: disjoint, complete, deterministic (across processes too),
and the held-out image count as close to the target as its documented rule allows."""
import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from sano_jax.datasets import split_subjects

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _oracle(counts, fraction):
  """Brute force over the prefixes of the sha256 order: the prefix whose image count is closest
  to the target (on a tie the longer one), then at least one subject on each side."""
  order = sorted(counts, key=lambda s: hashlib.sha256(s.encode()).hexdigest())
  sums = np.concatenate([[0], np.cumsum([counts[s] for s in order])])
  target = fraction * sums[-1]
  dist = np.abs(sums - target)
  k = int(np.flatnonzero(dist == dist.min()).max())
  if k == 0 and fraction > 0 and len(order) >= 2:
    k = 1
  if k == len(order) and len(order) >= 2:
    k -= 1
  return set(order[k:]), set(order[:k])


def _random_counts(rng, n):
  ids = {f'{rng.choice(["p", "subj_", ""])}{rng.integers(0, 10**7):07d}' for _ in range(n)}
  return {s: int(rng.integers(1, 40)) for s in ids}


def test_disjoint_complete_and_matches_oracle():
  rng = np.random.default_rng(0)
  for _ in range(300):
    counts = _random_counts(rng, int(rng.integers(1, 30)))
    fraction = float(rng.choice([0.0, 0.05, 0.2, 0.5, 0.8, 1.0, rng.uniform()]))
    kept, held = split_subjects(counts, fraction)
    assert not kept & held
    assert kept | held == set(counts)
    assert (kept, held) == _oracle(counts, fraction), (counts, fraction)
    if len(counts) >= 2 and 0 < fraction < 1:
      assert kept and held


def test_fraction_close_to_target():
  # 100 subjects of 5 images: the held-out count is within half a subject of the target.
  counts = {f'patient{i:03d}': 5 for i in range(100)}
  for fraction in (0.1, 0.2, 0.25, 0.33):
    kept, held = split_subjects(counts, fraction)
    n_held = sum(counts[s] for s in held)
    assert abs(n_held - fraction * 500) <= 2.5, (fraction, n_held)
    assert len(kept) + len(held) == 100
  # Uneven subjects (1..20 images): within half of the largest subject.
  rng = np.random.default_rng(1)
  counts = {f's{i}': int(rng.integers(1, 21)) for i in range(200)}
  total = sum(counts.values())
  for fraction in (0.1, 0.2, 0.5):
    _, held = split_subjects(counts, fraction)
    assert abs(sum(counts[s] for s in held) - fraction * total) <= 10


def test_edge_cases():
  assert split_subjects({'a': 3}, 0.2) == ({'a'}, set())
  assert split_subjects({'a': 3, 'b': 4}, 0.0) == ({'a', 'b'}, set())
  kept, held = split_subjects({'a': 3, 'b': 4}, 0.01)  # both sides nonempty with >= 2 subjects
  assert len(kept) == len(held) == 1
  kept, held = split_subjects({'a': 3, 'b': 4, 'c': 1}, 1.0)
  assert len(kept) == 1 and len(held) == 2
  assert split_subjects({}, 0.2) == (set(), set())


def test_deterministic_in_any_order_and_process():
  rng = np.random.default_rng(2)
  counts = _random_counts(rng, 40)
  ref = split_subjects(counts, 0.3)
  shuffled = dict(sorted(counts.items(), key=lambda kv: rng.random()))
  assert split_subjects(shuffled, 0.3) == ref
  # Another interpreter with another string-hash seed: the same split (no use of hash()).
  code = ('import json, sys; from sano_jax.datasets import split_subjects; '
          'k, h = split_subjects(json.loads(sys.stdin.read()), 0.3); print(json.dumps(sorted(h)))')
  for seed in ('1', '12345'):
    out = subprocess.run([sys.executable, '-c', code], input=json.dumps(counts), cwd=ROOT,
                         env={**os.environ, 'PYTHONHASHSEED': seed}, capture_output=True, text=True,
                         timeout=float(os.environ.get('SANO_TEST_SUBPROCESS_TIMEOUT', 600)))
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout) == sorted(ref[1])


@pytest.mark.parametrize('fraction', [0.2, 0.5])
def test_adding_a_subject_moves_few_others(fraction):
  """Hash order: a new subject does not reshuffle the others (at most the boundary moves)."""
  counts = {f'id{i}': 4 for i in range(50)}
  _, held = split_subjects(counts, fraction)
  _, held2 = split_subjects({**counts, 'newcomer': 4}, fraction)
  assert len((held ^ held2) - {'newcomer'}) <= 2
