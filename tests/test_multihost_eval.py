"""Multi-host evaluation (issue 11 item 5): the merges of every evaluation accumulator against one
pass over the whole set (one process), and `evaluate` by 2 processes x 2 CPU devices against
1 process x 4 devices, for the exact and the binned metrics (jax.distributed on localhost, gloo).

End to end, every count, name and structure must be equal and every float equal to 1e-5 relative:
not bit for bit, because XLA:CPU's output for the same program and per-device batch depends on how
many devices the process has (measured: the same 2-device step in a process with 2 and one with 4
host devices differs in the last bit of some pixels, with or without multi-threaded Eigen). The
merges themselves are exact (the unit tests); the 2-process path runs them all.

Merge tests feed the parts as `evaluate` does with several processes: padded batches, the images'
global indices, a process's share being either a contiguous run of the set or its half of every
global batch (`input_pipeline.eval_iterator`), and merge them in both orders.
"""
import ast
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from sano_jax import accumulator
from sano_jax import eval_batches, gather, groups, score_stats, metrics as M, report, train


from tests import multihost_eval_worker as worker
from tests.helpers import read_log, run_process_pair, subprocess_env, subprocess_timeout

RUNS, SEED, N_SIGMA, BATCH = 9, 3, 1.5, 4


def _data(n=30, size=9, seed=0):
  """Scores (rounded: many ties), masks (two images in three hold a square), subjects (5 images
  each, so subjects straddle the parts) and an attribute."""
  rng = np.random.default_rng(seed)
  y = np.zeros((n, size, size), bool)
  for i in range(n):
    if i % 3:
      a, b = rng.integers(0, size - 2, 2)
      y[i, a:a + 2, b:b + 3] = True
  s = np.round(np.abs(rng.normal(size=y.shape)) + 1.5 * y * rng.uniform(0.5, 2, (n, 1, 1)), 1)
  subjects = np.array([f's{(7 * (i // 5)) % 10}' for i in range(n)])  # first appearance != sorted
  kind = np.array(['a', 'b', 'c', 'b'])[np.arange(n) % 4]
  return s.astype(np.float32), y, subjects, {'kind': kind}


def _splits(n):
  """(name, [part index arrays]): contiguous cuts at several points, and evaluate's layout (each
  process takes its half of every global batch of 2 * BATCH)."""
  out = [(f'cut{k}', [np.arange(k), np.arange(k, n)]) for k in (1, 5, 11, n - 1)]
  rows = np.arange(-(-n // (2 * BATCH)) * 2 * BATCH).reshape(-1, 2, BATCH)
  out.append(('batch_halves', [r[r < n] for r in (rows[:, 0].ravel(), rows[:, 1].ravel())]))
  return out


def _feed(add, idx, s, y, subj, attrs=None):
  """Feeds images `idx` (global indices) in padded batches of BATCH, as evaluate does: padding
  has valid False, index -1, a score and mask that would change every metric if counted."""
  for a in range(0, len(idx), BATCH):
    sel = idx[a:a + BATCH]
    pad = BATCH - len(sel)
    padded = lambda x, fill: np.concatenate([x[sel], np.full((pad,) + x.shape[1:], fill, x.dtype)])
    valid = np.r_[np.ones(len(sel), bool), np.zeros(pad, bool)]
    args = (padded(s, 99.0), padded(y, True), padded(subj, 'pad'), valid)
    index = np.r_[sel, -np.ones(pad, np.int64)]
    if attrs is None:
      add(*args, indices=index)
    else:
      add(*args, {k: padded(v, '') for k, v in attrs.items()}, indices=index)


def _make(binned, s, exact_max=None):
  if binned:
    return accumulator.PixelMetricsAccumulator(2**10, (0.0, float(s.max()) + 1e-3), (N_SIGMA, 2.5))
  return accumulator.PixelMetricsAccumulator(2**10, (0.0, float(s.max()) + 1e-3), (N_SIGMA, 2.5),
                                   exact_max_pixels=s.size if exact_max is None else exact_max)


@pytest.mark.parametrize('kind', ['exact', 'binned', 'exact_overflowing'])
def test_pixel_accumulator_merge_equals_one_pass(kind):
  """Exact equality: counts add, per-image Dice/IoU are summed per subject in index order, the
  subjects (bootstrap columns) are ordered by first image; 'exact_overflowing': each part fits
  exact_max_pixels but the whole does not, so the merge falls back to the bins as one pass does."""
  s, y, subj, _ = _data()
  make = lambda: _make(kind == 'binned', s, s.size - 1 if kind == 'exact_overflowing' else None)
  whole = make()
  _feed(whole.add, np.arange(len(s)), s, y, subj)
  want = whole.compute(RUNS, SEED)
  assert want['method'] == ('exact' if kind == 'exact' else 'binned')
  assert want['num_subjects'] == 6 and want['n_sigma']['dice_per_image_std'] > 0
  unindexed = make()  # the default indices (next in line) are the positions of one pass
  unindexed.add(s, y, subj)
  np.testing.assert_equal(unindexed.compute(RUNS, SEED), want)
  for name, parts in _splits(len(s)):
    accs = []
    for idx in parts:
      accs.append(make())
      _feed(accs[-1].add, idx, s, y, subj)
    for order in (accs, accs[::-1]):
      merged = accumulator.PixelMetricsAccumulator.merge(order)
      assert merged.subjects == whole.subjects, name
      np.testing.assert_equal(merged.compute(RUNS, SEED), want, err_msg=name)
      for a, b in zip(merged.curve_levels(), whole.curve_levels()):
        np.testing.assert_array_equal(a, b, err_msg=name)
  merged.add(s[:2], y[:2], subj[:2], indices=[len(s), len(s) + 1])  # a merged one accumulates on
  assert merged.compute(0)['num_images'] == len(s) + 2


def test_pixel_accumulator_merge_rejects_other_settings():
  s, _, _, _ = _data()
  with pytest.raises(ValueError, match='different settings'):
    accumulator.PixelMetricsAccumulator.merge([_make(True, s), _make(True, s + 1)])
  with pytest.raises(ValueError, match='at least one'):
    accumulator.PixelMetricsAccumulator.merge([])


@pytest.mark.parametrize('binned', [False, True], ids=['exact', 'binned'])
def test_grouped_metrics_merge_equals_one_pass(binned):
  s, y, subj, attrs = _data()
  make = lambda: _make(binned, s)
  whole = groups.GroupedMetrics(('kind',), make)
  _feed(whole.add, np.arange(len(s)), s, y, subj, attrs)
  want = whole.compute(RUNS, SEED, n_sigma=N_SIGMA)
  assert set(want['kind']['values']) == {'a', 'b', 'c'} and want['kind']['gap']['auroc']['gap_std']
  for name, parts in _splits(len(s)):
    parts_g = []
    for idx in parts:
      parts_g.append(groups.GroupedMetrics(('kind',), make))
      _feed(parts_g[-1].add, idx, s, y, subj, attrs)
    for order in (parts_g, parts_g[::-1]):
      got = groups.GroupedMetrics.merge(order).compute(RUNS, SEED, n_sigma=N_SIGMA)
      np.testing.assert_equal(got, want, err_msg=name)


def test_streaming_range_and_figure_set_merge_equal_one_pass():
  s, y, _, _ = _data()
  whole_r, whole_f = M.StreamingRange(), report.FigureSet(5)  # pylint: disable=protected-access
  whole_r.add(s)
  whole_f.add(y, np.arange(len(s)), np.ones(len(s), bool))
  for name, parts in _splits(len(s)):
    ranges, figs = [], []
    for idx in parts:
      ranges.append(M.StreamingRange())
      ranges[-1].add(s[idx])
      figs.append(report.FigureSet(5))  # pylint: disable=protected-access
      figs[-1].add(y[idx], idx, np.ones(len(idx), bool))
    for r, f in ((ranges, figs), (ranges[::-1], figs[::-1])):
      assert M.StreamingRange.merge(r).range == whole_r.range, name
      assert report.FigureSet.merge(f).picks() == whole_f.picks(), name  # pylint: disable=protected-access
  assert len(whole_f.picks()) == 5


def _field(x):
  """A smooth nonlinear stand-in for the score field (signed, channel-mixing)."""
  return np.float32(3.0) * x * x - x[..., ::-1] + 0.25


@pytest.mark.parametrize('multi', [False, True], ids=['ScoreStats', 'MultiStats'])
def test_stats_merge_equals_one_pass_and_the_device_tree_is_fixed(multi):
  """merge_stats of two halves = one streamed pass (moments to float32 rounding, histograms and
  counts exactly), in either order; and the fixed pairwise tree over 4 devices equals the tree
  over 2 processes' already-merged pairs bit for bit (what makes 2 x 2 devices equal 1 x 4)."""
  rng = np.random.default_rng(1)
  images = rng.uniform(size=(12, 8, 8, 2)).astype(np.float32)
  if multi:
    fn = lambda x: [_field(x), 0.5 * _field(-x)]
    init = lambda: score_stats.init_multi_stats((8, 8, 2), (0.1, 0.4), num_bins=256)
  else:
    fn = _field
    init = lambda: score_stats.init_stats((8, 8, 2), num_bins=256)
  step = jax.jit(score_stats.make_stats_step(fn, 2.0))

  def fit(idx):
    st = init()
    for a in range(0, len(idx), 4):
      chunk = np.zeros((4,) + images.shape[1:], np.float32)
      chunk[:len(idx[a:a + 4])] = images[idx[a:a + 4]]
      st = step(st, chunk, np.arange(4) < len(idx[a:a + 4]))
    return jax.device_get(st)

  whole = fit(np.arange(12))
  flat = lambda st: jax.tree_util.tree_flatten_with_path(st)[0]
  for cut in (3, 5, 8):
    a, b = fit(np.arange(cut)), fit(np.arange(cut, 12))
    for merged in (score_stats.merge_stats(a, b), score_stats.merge_stats(b, a)):
      for (path, x), (_, w) in zip(flat(jax.device_get(merged)), flat(whole)):
        if np.issubdtype(np.asarray(w).dtype, np.integer) or 'count' in str(path) or \
            'n_images' in str(path):
          np.testing.assert_array_equal(x, w, err_msg=str(path))
        else:
          np.testing.assert_allclose(x, w, rtol=2e-5, atol=1e-6, err_msg=str(path))
  devices = [fit(np.arange(i, 12, 4)) for i in range(4)]
  pair = lambda xs: gather.pairwise(xs, score_stats.merge_stats)  # pylint: disable=protected-access
  one_process = jax.device_get(pair(devices))
  two_processes = jax.device_get(pair([pair(devices[:2]), pair(devices[2:])]))
  for (path, x), (_, w) in zip(flat(two_processes), flat(one_process)):
    np.testing.assert_array_equal(x, w, err_msg=str(path))
  stacked = jax.tree.map(lambda *xs: np.stack(xs), *devices)
  for (path, x), (_, w) in zip(flat(gather.merge_device_stats(stacked)), flat(one_process)):
    np.testing.assert_array_equal(x, w, err_msg=str(path))
  other = score_stats.init_stats((8, 8, 2) if multi else (8, 4, 2), num_bins=256)
  with pytest.raises(ValueError, match='cannot merge'):
    score_stats.merge_stats(whole, other)
  if multi:  # old statistics (no per-channel density) do not silently drop the new ones' density
    with pytest.raises(ValueError, match='per-channel densities.*format 3'):
      score_stats.merge_stats(whole, whole.replace(channel_density=None))
    old = score_stats.merge_stats(whole.replace(channel_density=None),
                                   whole.replace(channel_density=None))
    assert old.channel_density is None


# ------------------------------------------------------------------------------------------------
# End to end: 2 processes x 2 devices against 1 process x 4 devices.

WORKER = os.path.abspath(worker.__file__)


def _lines(out, i, what):
  return re.findall(rf'^process {i} {what}$', out, re.M)


def _assert_close(got, want, where=''):
  """Same keys, lengths, types and non-float values; floats equal to 1e-5 relative (or 1e-7)."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and list(got) == list(want), (where, got, want)
    for k in want:
      _assert_close(got[k], want[k], f'{where}/{k}')
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (where, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      _assert_close(g, w, f'{where}[{i}]')
  elif isinstance(want, float):
    assert isinstance(got, float) and abs(got - want) <= 1e-5 * abs(want) + 1e-7, (where, got, want)
  else:
    assert got == want and type(got) is type(want), (where, got, want)


def _metrics(path, workdir):
  """metrics.json with the workdir cut out of its paths and without timing (wall clock)."""
  with open(path) as f:
    m = json.loads(f.read().replace(str(workdir), 'WORKDIR'))
  # The statistics' file is named by its hash: equal statistics up to float rounding (the merge
  # order of two processes) get other names. Their values are compared through the metrics.
  m['score_stats']['path'] = re.sub(r'stats-[0-9a-f]+\.npz$', 'stats-HASH.npz',
                                    m['score_stats']['path'])
  return m, m.pop('timing')


@pytest.mark.slow
def test_two_processes_evaluate_like_one(tmp_path):
  data = worker.sources()
  wd, single_wd = tmp_path / 'run', tmp_path / 'single'
  train.train_and_evaluate(worker.config('exact'), str(wd), train_source=data['train'],
                           val_source=data['validation'])
  shutil.copytree(wd, single_wd)  # the two evaluations write their own eval/ and bundle
  single_log = tmp_path / 'single.log'
  with open(single_log, 'w') as f:  # meanwhile: the reference, one process with 4 devices
    single = subprocess.Popen([sys.executable, WORKER, str(single_wd), str(tmp_path / 'single'), '4'],
                              stdout=f, stderr=subprocess.STDOUT, env=subprocess_env(4))
  try:
    outs = run_process_pair([WORKER, wd, tmp_path / 'pair', 2], tmp_path / 'pair')
    single.wait(timeout=max(1.0, subprocess_timeout()))
  except subprocess.TimeoutExpired:
    pytest.fail(f'the single process did not finish:\n{read_log(single_log)}')
  finally:
    if single.poll() is None:
      single.kill()
      single.wait()
  assert single.returncode == 0, read_log(single_log)

  for i, out in enumerate(outs):
    assert _lines(out, i, 'of 2 done'), out[-4000:]
    assert _lines(out, i, r'returned (\w+)') == [['metrics', 'None'][i]] * 2, out[-4000:]
  # Only process 0 writes in the run directory (process 1 not even a folder).
  (wrote0,), (wrote1,) = (_lines(outs[i], i, r'wrote (\[.*\])') for i in range(2))
  assert ast.literal_eval(wrote1) == [], wrote1
  assert {'inference.json', os.path.join('eval', 'metrics.json')} <= set(ast.literal_eval(wrote0))
  for path in ('exact', 'binned'):
    got, got_timing = _metrics(f'{tmp_path / "pair"}.{path}.json', wd)
    want, want_timing = _metrics(f'{tmp_path / "single"}.{path}.json', single_wd)
    assert got['method'] == path and got['num_images'] == worker.NUM_TEST
    assert got['groups']['kind']['values']['none']['num_positive_pixels'] == 0
    assert (got_timing['num_devices'], got_timing['num_processes']) == (4, 2)
    assert (want_timing['num_devices'], want_timing['num_processes']) == (4, 1)
    assert got_timing['test_passes'] == want_timing['test_passes'] == (1 if path == 'exact' else 2)
    _assert_close(got, want, path)


@pytest.mark.four_devices
def test_eval_batch_not_divisible_by_processes_is_a_clear_error(monkeypatch):
  from tests.helpers import tiny_config  # pylint: disable=g-import-not-at-top
  config = tiny_config(**{'eval.batch_size': 9})
  monkeypatch.setattr(jax, 'process_count', lambda: 2)
  with pytest.raises(ValueError, match=r'eval.batch_size=9 is not divisible by the 2 processes'):
    eval_batches.eval_mesh(config)
  config.eval.batch_size = 8
  # 4 images a process, 4 local devices: all of them (as many local devices as divide 4).
  assert eval_batches.eval_mesh(config).devices.size == 4
  config.eval.batch_size = 12  # 6 images a process: 3 of the 4 devices (the most that divide 6)
  assert eval_batches.eval_mesh(config).devices.size == 3
