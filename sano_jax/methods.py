"""The registry of anomaly-localization methods (`config.method`): names -> `Method` classes.

Every method implements `sano_jax.method_base.Method` (init, losses, field); training, checkpoints,
healthy statistics, thresholds, metrics, figures, predict and `load_localizer` are shared and never
branch on the method. 'sano' is `sano_jax/sano.py`; the others are found in sano_jax/baselines/:
every module there that defines METHODS = {name: Method subclass} adds its methods ('anoddpm':
`baselines/anoddpm.py`; 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan': `baselines/autoencoders.py`).
A new method is a new module in sano_jax/baselines/ and its config block; nothing here changes.
"""
from __future__ import annotations

import copy
import importlib
import pkgutil

from sano_jax import baselines
from sano_jax import multiscale
from sano_jax.method_base import Method
from sano_jax.sano import SANO

METHODS = ('sano', 'ae', 'vae', 'cevae', 'vqvae', 'anovaegan', 'anoddpm')  # the shipped ones


def registry() -> dict[str, type[Method]]:
  """{name: Method class}: SANO and the METHODS of every module in sano_jax/baselines/."""
  found = {SANO.name: SANO}
  for info in sorted(pkgutil.iter_modules(baselines.__path__), key=lambda m: m.name):
    module = importlib.import_module(f'{baselines.__name__}.{info.name}')
    found.update(getattr(module, 'METHODS', {}))
  return {**{n: found[n] for n in METHODS if n in found}, **found}  # the shipped ones first


def check_name(name: str) -> str:
  known = registry()
  if name not in known:
    raise ValueError(f'unknown method {name!r}: config.method must be one of {", ".join(known)}')
  return name


def method_name(config) -> str:
  """config.method, 'sano' for configs (and workdirs) written before methods existed."""
  return check_name(str(config.get('method', 'sano')))


def method_class(config) -> type[Method]:
  """The class of the method `config.method` selects (its static facts, without building it)."""
  return registry()[method_name(config)]


def create(config) -> Method:
  """The method `config.method` selects, built from its own config block."""
  return method_class(config)(config)


def create_at(config, ts) -> Method:
  """`config`'s method with its field taken at every t of `ts` (the calibration's grid); a method
  without t as it is. `config` is not changed."""
  if create(config).ts == (None,):
    return create(config)
  config = copy.deepcopy(config)
  multiscale.set_t(config, ts)
  return create(config)
