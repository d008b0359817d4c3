"""Label-free calibration: t (or a t-set), the rule and N, chosen on synthetic anomalies.

The paper's promise is a threshold set without anomalous images. Which t and which healthy-statistics
rule rank anomalies best differs per dataset (brick: the per-pixel rule at small t; grass: the
multiscale density), so `calibrate` decides from the healthy validation split alone:

1. the validation images are split in two halves (even / odd positions);
2. healthy statistics of every t of `T_GRID` (`MultiStats`: each t, and the log-map Gaussian over
   all of them) are fitted on one half;
3. the other half gets one synthetic anomaly per image (`sano_jax.synthetic`: a patch of another
   healthy image rotated or rescaled and matched to the image's intensities, a noisy region, an
   intensity shift; rectangles or ellipses of side S/4..S/2, exact masks), or several per image
   when the split is small (at least `config.localize.min_synthetic_images` in all, MIN_SYNTHETIC);
4. every candidate (rule x t with the per-channel density among the rules, and over three
   t-sets the joint density and the mean of the one-t densities, each at the smoothing sigmas
   SIGMA_FACTORS x config.localize.smoothing_sigma; every density rule also on log maps centred
   per image, `multiscale.log_features`) scores them;
   the halves then swap roles (cross-fitting: every image serves once each way, twice the
   synthetic anomalies of a single split); the candidate with the best `kind_score` wins (the
   synthetic pixel AUROC of each kind, combined by a geometric mean of the margins over chance:
   every kind must be found), or among those within one bootstrap standard error of it the one
   with the best synthetic Dice (`one_se_choice`); N is its threshold of the best Dice averaged
   over the kinds
   (`metrics.macro_dice_threshold`; the pooled best Dice let the easy `noise` kind, whose z runs
   far higher, set N: retina's test Dice at N 0.149 against 0.469).

No test image or label is read. Methods without t (the reconstruction baselines) choose only the
rule, sigma and N. The choice is applied by `apply` (config.localize) and saved with the statistics.
"""
from __future__ import annotations

import copy
import functools
import time

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from sano_jax import anomaly_maps
from sano_jax import image_checks
from sano_jax import localization
from sano_jax import metrics as metrics_lib
from sano_jax import multiscale
from sano_jax import score_stats
from sano_jax import synthetic

T_GRID = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.4)
DENSITY_SETS = ((0.005, 0.01, 0.02, 0.05), (0.02, 0.05, 0.1, 0.2, 0.4), T_GRID)
Z_RULES = ('global', 'per_pixel', 'two_sided')
MIN_MARGIN = 0.05  # kind_score: a kind's AUROC counts as at least 0.5 + MIN_MARGIN
MAX_PIXELS = 2**19  # synthetic pixels kept per candidate (a fixed uniform subsample beyond)
# The smoothing sigmas tried, in units of config.localize.smoothing_sigma (one forward pass serves
# all). Measured on the demo models (benchmarks/calibration_oracle.py): brick chose per_pixel at 2x
# (test AUROC 0.972 vs 0.964 at 1x), grass and gravel the density at t = 0.05 at 1x, retina the
# per-channel density at t = 0.005 at 0.5x (0.942; 0.896 for per_pixel at 2x, the best before the
# one-t density was a candidate). With the arithmetic mean over kinds the same grid chose two_sided
# at 2x on grass (test 0.60): `kind_score` is what makes the grid safe.
SIGMA_FACTORS = (0.5, 1.0, 2.0)
# Synthetic anomalies wanted over both folds (config.localize.min_synthetic_images): a validation
# split of n < MIN_SYNTHETIC images gives each image ceil(MIN_SYNTHETIC / n) anomalies
# (`synthetic.synthetic_set`'s draws), so that a small split (KolektorSDD's 53 images) does not
# rank ~140 candidates on 53 anomalies; the embedded variants' splits (315-376 images) keep one.
MIN_SYNTHETIC = 256
TIE_RUNS = 50  # paired bootstraps of the synthetic score gaps (`one_se_choice`)
TIE_BAND = 16  # the best candidates by score that may tie with the first


# ---------------------------------------------------------------------------------------------
# Candidates and the choice.


def candidates(ts: tuple) -> list[tuple[str, tuple[int, ...]]]:
  """(rule, indices into ts) for every z rule and the (per-channel) density at every t, and over
  each t-set the joint density and the mean of its one-t densities ('density_mean')."""
  out = [(rule, (i,)) for i in range(len(ts)) for rule in Z_RULES + ('density',)]
  if len(ts) == 1:
    return out
  for tset in DENSITY_SETS:
    idx = tuple(i for i, t in enumerate(ts) if t in tset)
    if len(idx) > 1:
      out += [('density', idx), ('density_mean', idx)]
  return out


def candidate_stats(stats: score_stats.MultiStats, cands) -> list:
  """Each candidate's statistics, `stats.select(idx)`, with its densities' whitening computed here
  once (`score_stats.whitened`; the t-sets' joint densities one by one), not in the z-map program
  of every batch."""
  whitened = score_stats.whitened(stats)
  out = []
  for rule, idx in cands:
    sel = whitened.select(idx)
    if rule == 'density' and len(idx) > 1 and sel.density.whiten is None:
      sel = sel.replace(density=multiscale.with_whitening(sel.density))
    out.append(sel)
  return out


def candidate_zmaps(per_candidate: list, fields, cands) -> jax.Array:
  """z-maps [num_candidates, B, H, W] of all candidates from the K fields (jit-able), smoothed
  with the stats' sigma; per_candidate: `candidate_stats(stats, cands)`."""
  fields = anomaly_maps.as_fields(fields)
  one_t = {}  # t index -> its one-t density z: shared by 'density' at that t and 'density_mean'

  def density_at(st, idx, j):  # the one-t density z of t index idx[j] (st: idx's statistics)
    if idx[j] not in one_t:
      one_t[idx[j]] = localization.combine(st.select((j,)), [fields[idx[j]]], 'density')
    return one_t[idx[j]]

  def zmap(st, rule, idx):
    if rule == 'density_mean':  # = localization.combine's, each t's z traced once, not per t-set
      return jnp.mean(jnp.stack([density_at(st, idx, j) for j in range(len(idx))]), axis=0)
    if rule == 'density' and len(idx) == 1:
      return density_at(st, idx, 0)
    return localization.combine(st, [fields[i] for i in idx], rule)

  return jnp.stack([zmap(st, rule, idx) for st, (rule, idx) in zip(per_candidate, cands)])


@functools.lru_cache(maxsize=None)
def jitted_zmaps(cands: tuple):
  """`candidate_zmaps` of `cands`, jitted once per process: a later calibration (another evaluation)
  reuses its traced programs instead of tracing the ~100 candidates again (same results)."""
  return jax.jit(lambda per_candidate, fields: candidate_zmaps(per_candidate, fields, cands))


_update_multi_stats = jax.jit(score_stats.update_multi_stats)  # one jit for every calibration


def read_images(source, indices) -> np.ndarray:
  """Images [N,H,W,C] float32 in [0, 1] of `source` at `indices`."""
  return image_checks.to_unit(np.stack([source[int(i)]['image'] for i in indices]))


def batched(images: np.ndarray, batch_size: int):
  """(chunk [batch_size, ...], valid bool [batch_size]) over `images`, the last chunk padded with
  zeros (static shapes: one compiled program for every batch)."""
  for i in range(0, len(images), batch_size):
    chunk = images[i:i + batch_size]
    valid = np.ones((batch_size,), bool)
    if len(chunk) < batch_size:  # static shapes: pad the last batch
      valid[len(chunk):] = False
      chunk = np.concatenate([chunk, np.zeros((batch_size - len(chunk),) + chunk.shape[1:],
                                              chunk.dtype)])
    yield chunk, valid


def calibrate(config, method, params, source, *, max_images: int = 512, seed: int = 0,
              sigma_factors: tuple = SIGMA_FACTORS) -> dict:
  """Chooses t, rule and N from the healthy `source` (module docstring) for `method`, a Method
  whose field is taken at every t of T_GRID (`methods.create_at(config, T_GRID)`; a method without
  t as it is); `config` gives the batch size, the base smoothing sigma and the synthetic kinds.

  Returns {'t', 'rule', 'n_sigma', 'candidates': [...], 'synthetic': {...}, 'seconds'}."""
  n = len(source)
  if n < 4:
    raise ValueError(f'calibration needs at least 4 healthy validation images, got {n}')
  pick = np.unique(np.linspace(0, n - 1, min(n, max_images)).round().astype(int))
  images = read_images(source, pick)
  return choose(method.field_fn(params), method.ts, images,
                batch_size=int(config.eval.batch_size),
                smoothing_sigma=float(config.localize.smoothing_sigma), seed=seed,
                sigma_factors=sigma_factors, kinds=synthetic.kinds_of(config),
                min_synthetic=config.localize.get('min_synthetic_images', MIN_SYNTHETIC))


def stats_variants(sigmas, cands) -> list[tuple[float, bool, tuple]]:
  """(smoothing sigma, centred density, candidates) in the order of the calibration's rows: every
  candidate at each sigma, then the density rules again on centred log maps at each sigma."""
  density = tuple(c for c in cands if c[0] in localization.DENSITY_RULES)
  return ([(float(s), False, tuple(cands)) for s in sigmas]
          + ([(float(s), True, density) for s in sigmas] if density else []))


def fit_stats_at(fields_fn, images: np.ndarray, ts: tuple, variants, batch_size: int) -> list:
  """MultiStats of healthy `images` [N,H,W,C] in [0,1] for each (smoothing sigma, centred
  density, ...) of `variants` (`stats_variants`), one forward pass (`fields_fn`, jitted: [0,1]
  images -> list of K fields) per batch for all of them."""
  update = _update_multi_stats
  stats = [score_stats.init_multi_stats(images.shape[1:], ts, smoothing_sigma=v[0],
                                        centred_density=v[1]) for v in variants]
  for chunk, valid in batched(images, batch_size):
    fields = fields_fn(chunk)
    stats = [update(st, fields, valid) for st in stats]
  return [score_stats.finalize(jax.device_get(st)) for st in stats]


def choose(field_fn, ts: tuple, images: np.ndarray, *, batch_size: int,
           smoothing_sigma: float = 2.0, seed: int = 0,
           sigma_factors: tuple = SIGMA_FACTORS, kinds: tuple = synthetic.KINDS,
           min_synthetic: int = MIN_SYNTHETIC) -> dict:
  """The calibration proper: field_fn(x in [-1,1]) -> K fields (one per t of `ts`, or one field
  when ts == (None,)); images [N,H,W,C] float in [0,1], healthy. Fits on one half, scores
  synthetic anomalies made in the other, both ways, at every smoothing sigma of
  sigma_factors x `smoothing_sigma` (one forward pass per image serves all of them); returns the
  best candidate (`calibrate`)."""
  tic = time.perf_counter()
  sigmas = tuple(float(f) * float(smoothing_sigma) for f in sigma_factors)
  cands = candidates(ts)
  variants = stats_variants(sigmas, cands)
  fields_fn = jax.jit(lambda x: anomaly_maps.as_fields(field_fn(2.0 * x - 1.0)))
  n, h, w = images.shape[:3]
  if isinstance(min_synthetic, bool) or not isinstance(min_synthetic, (int, np.integer)) or (
      min_synthetic < 0):
    raise ValueError('config.localize.min_synthetic_images must be an integer >= 0 (0: one '
                     f'synthetic anomaly per image), got {min_synthetic!r}')
  draws = max(1, -(-int(min_synthetic) // n))  # anomalies per image (MIN_SYNTHETIC)
  keep_fraction = min(1.0, MAX_PIXELS / float(draws * n * h * w))  # pixels kept: a fixed share
  keep_rng = np.random.default_rng(seed)
  zs, labels, kind_ids, image_ids = [], [], [], []
  logging.info('calibration: %d healthy images, %d synthetic anomalies each, %d candidates, '
               '2 folds', n, draws, sum(len(v[2]) for v in variants))
  for fold in (0, 1):  # cross-fitting: each half fits the stats once and is synthesized once
    logging.info('calibration fold %d/2 (%.0f s)', fold + 1, time.perf_counter() - tic)
    fit, held = images[fold::2], images[1 - fold::2]
    stats = [candidate_stats(st, v[2])
             for st, v in zip(fit_stats_at(fields_fn, fit, ts, variants, batch_size), variants)]
    syn, masks, made = synthetic.synthetic_set(held, seed + fold, kinds, draws=draws)
    kind_map = np.asarray([kinds.index(k) for k in made])[:, None, None] * np.ones((h, w), int)
    for start, (chunk, valid) in zip(range(0, len(syn), batch_size), batched(syn, batch_size)):
      fields = fields_fn(chunk)
      m = masks[start:start + batch_size].reshape(-1)
      keep = keep_rng.random(m.size) < keep_fraction
      zs.append(np.concatenate([
          np.asarray(jitted_zmaps(cands_v)(st, fields))[:, valid].reshape(len(cands_v), -1)
          for (_, _, cands_v), st in zip(variants, stats)])[:, keep])
      labels.append(m[keep])
      kind_ids.append(kind_map[start:start + batch_size].reshape(-1)[keep])
      # The healthy image under each synthetic one (its draws share it), unique over both folds:
      # fold * n + its position in `held` (with one draw per image, the synthetic image's own id).
      ids = fold * n + np.arange(start, start + len(m) // (h * w)) % len(held)
      image_ids.append(np.repeat(ids, h * w)[keep])
  zs, labels, kind_ids, image_ids = (np.concatenate(zs, axis=1), np.concatenate(labels),
                                     np.concatenate(kind_ids), np.concatenate(image_ids))
  zs = nan_last(zs)  # once for the ranking and the tie bootstrap
  logging.info('calibration: ranking %d candidates (%.0f s)', len(zs), time.perf_counter() - tic)
  rows = []
  for (sigma, centred, (rule, idx)), z in zip([(s, c, r) for s, c, rs in variants for r in rs], zs):
    curves = metrics_lib.grouped_curve_metrics(z, labels, kind_ids)  # one sort per candidate
    m = curves['pooled']
    by_kind = {k: curves['by_group'][i]['auroc'] for i, k in enumerate(kinds)
               if i in curves['by_group']}
    threshold, macro_dice = curves['macro_threshold']
    rows.append({'rule': rule, 't': [ts[i] for i in idx], 'smoothing_sigma': sigma,
                 'density_centred': centred,
                 'score': kind_score(by_kind),
                 'auroc_macro': float(np.nanmean(list(by_kind.values()))),
                 'auroc_by_kind': by_kind, 'auroc': m['auroc'], 'auprc': m['auprc'],
                 'best_dice': m['dice'], 'macro_dice': macro_dice, 'threshold': threshold})
  best = rows[one_se_choice(rows, zs, labels, kind_ids, image_ids, seed=seed)]
  return {'t': best['t'], 'rule': best['rule'], 'n_sigma': float(best['threshold']),
          'smoothing_sigma': best['smoothing_sigma'], 'density_centred': best['density_centred'],
          'candidates': rows,
          'synthetic': {'num_images': n, 'num_synthetic_images': draws * n,
                        'kinds': list(kinds), 'pixels_scored': int(labels.size), 'seed': seed},
          'seconds': time.perf_counter() - tic}


def nan_last(z: np.ndarray) -> np.ndarray:
  """z with NaN (a zero field over zero healthy spread: 0/0) as its dtype's lowest finite value,
  so that such pixels rank last instead of failing the metrics (they take finite scores only)."""
  return np.nan_to_num(z, nan=np.finfo(z.dtype).min, copy=False)


def one_se_choice(rows: list, zs: np.ndarray, labels: np.ndarray, kind_ids: np.ndarray,
                  image_ids: np.ndarray, *, seed: int = 0, runs: int = TIE_RUNS,
                  band: int = TIE_BAND) -> int:
  """The index of the chosen row: the one-standard-error rule (Breiman et al. 1984) on the
  synthetic anomalies (zs [candidates, pixels] as `choose` ranks them), ties broken by the synthetic
  Dice.

  Candidates whose `kind_score` is within the noise of the best one's are tied: gap_j = S_best -
  S_j <= se_j, with se_j the std over `runs` paired bootstraps of S_best - S_j (`band` best
  candidates tried). A bootstrap resamples with replacement, within each kind, the healthy images
  under the synthetic ones (image_ids: the draws of one healthy image share its background, so
  they go together; counted as independent they would shrink the se), one set of multiplicities
  for all candidates. Among the tied, the best macro Dice at its own N wins (the Dice
  is what the mask is for). Why: near the top the score differences are often smaller than their
  noise, and the AUROC alone then picks a smoothing at random. Retina's demo model: the t-set
  'density_mean' at sigma 2 and at sigma 1 scored 0.9065 and 0.9059 (se of the gap 0.0025), but
  their synthetic Dice 0.41 and 0.46 and test AUROC 0.926 and 0.940; on grass the next candidate
  at sigma 1 is 0.015 below (se 0.0045), not tied, and the choice stands."""
  scores = np.asarray([np.nan_to_num(r['score'], nan=-1.0) for r in rows])
  top = sorted(range(len(rows)), key=lambda i: (-scores[i], -rows[i]['macro_dice']))[:band]
  rng = np.random.default_rng(seed)
  kinds = [kind_ids == k for k in np.unique(kind_ids)]
  weights = np.zeros((runs, image_ids.size))  # [runs, pixels]: each pixel's multiplicity
  for sel in kinds:  # a healthy image may be under several kinds: multiplicities per kind
    ids = np.unique(image_ids[sel])
    mult = np.zeros((runs, int(ids.max()) + 1))
    np.add.at(mult, (np.arange(runs)[:, None], rng.choice(ids, (runs, ids.size))), 1.0)
    weights[:, sel] = mult[:, image_ids[sel]]
  def boot(i):
    z = zs[i]
    by_kind = [metrics_lib.weighted_aurocs(z[sel], labels[sel], weights[:, sel]) for sel in kinds]
    return np.asarray([kind_score(dict(enumerate(a))) for a in zip(*by_kind)])
  best_runs = boot(top[0])
  tied = []
  for i in top:
    se = float(np.std(best_runs - boot(i))) if i != top[0] else 0.0
    rows[i]['score_gap_se'] = se
    if scores[top[0]] - scores[i] <= se:
      tied.append(i)
  return max(tied, key=lambda i: rows[i]['macro_dice'])


def kind_score(auroc_by_kind: dict) -> float:
  """What the choice maximizes: 0.5 + the geometric mean over kinds of max(AUROC_k - 0.5, 0.05)
  (kinds without a value are skipped).

  A geometric mean of the margins over chance, not the arithmetic mean of the AUROCs: a candidate
  must find EVERY kind. With the arithmetic mean, a kind that any wide smoothing solves (`noise`:
  0.97-0.99) outvoted the kinds that resemble real foreign content, and the sigma grid chose
  two_sided at sigma 4 on grass (test AUROC 0.60; the density at sigma 2: 0.82). The floor: a
  kind that no candidate lifts above AUROC 0.55 (a patch of a flat image pasted into a flat
  image) says nothing, and its noise around chance must not decide."""
  margins = np.asarray([v for v in auroc_by_kind.values() if np.isfinite(v)], np.float64) - 0.5
  if margins.size == 0:
    return float('nan')
  return float(0.5 + np.exp(np.mean(np.log(np.maximum(margins, MIN_MARGIN)))))


def apply(config, choice: dict):
  """config.localize with the calibrated t, rule and N (a copy; the input is not changed)."""
  config = copy.deepcopy(config)
  lc = config.localize
  if choice['t'] != [None]:
    multiscale.set_t(config, choice['t'])
  lc.stats = 'global' if choice['rule'] == 'two_sided' else choice['rule']
  lc.two_sided = choice['rule'] == 'two_sided'
  lc.n_sigma = float(choice['n_sigma'])
  if choice.get('smoothing_sigma') is not None:  # absent from choices saved before it was chosen
    lc.smoothing_sigma = float(choice['smoothing_sigma'])
  with config.unlocked():  # an older config.json has no density_centred
    lc.density_centred = bool(choice.get('density_centred', False))
  return config
