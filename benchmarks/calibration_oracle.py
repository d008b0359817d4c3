r"""How well does the label-free calibration choose? Each candidate's synthetic vs test score.

  PYTHONPATH=. python benchmarks/calibration_oracle.py --workdir=workdirs/cal/grass [--method=ae]

For every candidate of `calibration.choose` (rule x t of `calibration.T_GRID`, and the density
over its t-sets, at each smoothing sigma of SIGMA_FACTORS): the synthetic score it ranks by
(healthy validation images only), then the pixel AUROC / AUPRC / best Dice on the REAL test split
with statistics fitted on the whole validation split, and the test Dice at the candidate's
label-free N (the test labels: a diagnosis, never a choice). One JSON line per candidate, then a
summary line: the chosen candidate, the test-best one (an oracle, an upper bound for this model),
the regret (oracle AUROC - chosen AUROC) and the Spearman rank correlation of the synthetic score
and the test AUROC over the candidates.
"""
from __future__ import annotations

import json
import time

from absl import app
from absl import flags
import jax
import numpy as np
from scipy import stats as scipy_stats

from sano_jax import calibration
from sano_jax import checkpointing
from sano_jax import input_pipeline
from sano_jax import anomaly_maps
from sano_jax import methods
from sano_jax import metrics

flags.DEFINE_string('workdir', None, 'A trained run directory.')
flags.DEFINE_string('method', None, 'Override config.method (the run trained several).')
flags.DEFINE_integer('max_images', 512, 'Validation images the calibration reads (as run_eval).')
flags.DEFINE_list('sigma_factors', [str(f) for f in calibration.SIGMA_FACTORS],
                  'Smoothing sigmas weighed, in units of config.localize.smoothing_sigma.')
flags.DEFINE_string('tag', '', 'A label copied into every JSON line.')
flags.mark_flags_as_required(['workdir'])
FLAGS = flags.FLAGS


def test_split(source) -> tuple[np.ndarray, np.ndarray]:
  """(images [N,H,W,C] float32 in [0, 1], masks [N,H,W] bool) of the whole test split."""
  n = len(source)
  masks = np.stack([np.asarray(source[i]['mask'])[..., 0] > 0 for i in range(n)])
  return calibration.read_images(source, range(n)), masks


def main(argv):
  del argv
  tic = time.perf_counter()
  config = checkpointing.load_config(FLAGS.workdir)
  if FLAGS.method:
    with config.unlocked():
      config.method = FLAGS.method
  _, _, params, _ = checkpointing.restore_for_inference(FLAGS.workdir, config=config)
  val_source = input_pipeline.get_source(config, config.data.validation_split)
  test_x, test_m = test_split(input_pipeline.get_source(config, config.data.test_split))

  method = methods.create_at(config, calibration.T_GRID)
  choice = calibration.calibrate(config, method, params, val_source, max_images=FLAGS.max_images,
                                 seed=int(config.get('seed', 0)),
                                 sigma_factors=tuple(float(f) for f in FLAGS.sigma_factors))
  field_fn, ts = method.field_fn(params), method.ts
  cands = calibration.candidates(ts)
  bs = int(config.eval.batch_size)
  val_x = calibration.read_images(val_source, range(len(val_source)))
  fields_fn = jax.jit(lambda x: anomaly_maps.as_fields(field_fn(2.0 * x - 1.0)))
  sigmas = list(dict.fromkeys(r['smoothing_sigma'] for r in choice['candidates']))  # choose's order
  variants = calibration.stats_variants(sigmas, cands)
  zmaps = calibration.jitted_zmaps
  zs = [np.concatenate([np.asarray(zmaps(v[2])(per_cand, fields_fn(chunk)))[:, valid]
                        for chunk, valid in calibration.batched(test_x, bs)], axis=1)
        for v, stats in zip(variants, calibration.fit_stats_at(fields_fn, val_x, ts, variants, bs))
        for per_cand in [calibration.candidate_stats(stats, v[2])]]
  zs = np.concatenate(zs)  # [candidate, N, H, W], the order of choice['candidates']

  rows = []
  for z, syn in zip(zs, choice['candidates']):
    m = metrics.exact_curve_metrics(calibration.nan_last(z).reshape(-1), test_m.reshape(-1))
    row = {'tag': FLAGS.tag, 'rule': syn['rule'], 't': syn['t'],
           'smoothing_sigma': syn['smoothing_sigma'], 'density_centred': syn['density_centred'],
           'synthetic_score': round(syn['score'], 4),
           'synthetic_auroc': round(syn['auroc_macro'], 4),
           'synthetic_by_kind': {k: round(v, 3) for k, v in syn['auroc_by_kind'].items()},
           'synthetic_macro_dice': round(syn['macro_dice'], 4), 'n_sigma': round(syn['threshold'], 3),
           'test_auroc': round(m['auroc'], 4), 'test_auprc': round(m['auprc'], 4),
           'test_best_dice': round(m['dice'], 4),
           'test_dice_at_n': round(metrics.dice(z > syn['threshold'], test_m), 4)}
    rows.append(row)
    print(json.dumps(row), flush=True)
  key = ('rule', 't', 'smoothing_sigma', 'density_centred')
  chosen = next(r for r in rows if all(r[k] == choice[k] for k in key))
  oracle = max(rows, key=lambda r: r['test_auroc'])
  rho = scipy_stats.spearmanr([r['synthetic_score'] for r in rows],
                              [r['test_auroc'] for r in rows]).statistic
  print(json.dumps({'tag': FLAGS.tag, 'workdir': FLAGS.workdir, 'chosen': chosen, 'oracle': oracle,
                    'regret_auroc': round(oracle['test_auroc'] - chosen['test_auroc'], 4),
                    'spearman_synthetic_vs_test': round(float(rho), 3),
                    'n_val': len(val_x), 'n_test': len(test_x),
                    'calibration_seconds': round(choice['seconds'], 1),
                    'seconds': round(time.perf_counter() - tic, 1)}), flush=True)


if __name__ == '__main__':
  app.run(main)
