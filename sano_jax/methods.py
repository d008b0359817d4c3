"""The registry of anomaly-localization methods (`config.method`): names -> `Method` objects.

Every method implements `sano_jax.method_base.Method` (init, losses, field); training, checkpoints,
healthy statistics, thresholds, metrics, figures, predict and `load_localizer` are shared and never
branch on the method. 'sano': `sano_jax/sano.py`; 'anoddpm': `baselines/anoddpm.py`; 'ae', 'vae',
'cevae', 'vqvae', 'anovaegan': `baselines/autoencoders.py`.
"""
from __future__ import annotations

import copy

from sano_jax import multiscale
from sano_jax.baselines import anoddpm
from sano_jax.baselines import autoencoders
from sano_jax.method_base import Method  # pylint: disable=unused-import  (the interface, public here)
from sano_jax.sano import SANO

METHODS = ('sano', 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm')


def check_name(name: str) -> str:
  if name not in METHODS:
    raise ValueError(f'unknown method {name!r}: config.method must be one of {", ".join(METHODS)}')
  return name


def method_name(config) -> str:
  """config.method, 'sano' for configs (and workdirs) written before methods existed."""
  return check_name(str(config.get('method', 'sano')))


def create(config) -> Method:
  """The method `config.method` selects, built from its own config block."""
  name = method_name(config)
  if name == 'sano':
    return SANO(config)
  if name == 'anoddpm':
    return anoddpm.AnoDDPM(config)
  return autoencoders.create(name, config)


def create_at(config, ts) -> Method:
  """`config`'s method with its field taken at every t of `ts` (the calibration's grid); a method
  without t as it is. `config` is not changed."""
  if create(config).ts == (None,):
    return create(config)
  config = copy.deepcopy(config)
  multiscale.set_t(config, ts)
  return create(config)
