"""sano-jax: SANO, score-based anomaly localization, in JAX/Flax.

The public API: ``sano_jax.localize`` (from ``sano_jax.localization``; the module is not called
``localize`` so that the function of that name is never shadowed by a submodule),
``sano_jax.ScoreStats`` and ``sano_jax.fit_score_stats`` (from ``sano_jax.score_stats``),
``sano_jax.load_localizer`` (from ``sano_jax.rundir``, the run directory's reader), and
``sano_jax.load_exported`` (from ``sano_jax.export``: it needs only jax and numpy, never flax or
the model code).
"""

__version__ = '0.1.0'

_LAZY = {'localize': 'localization', 'ScoreStats': 'score_stats', 'fit_score_stats': 'score_stats'}


def __getattr__(name):
  # Lazy, so that `import sano_jax` stays cheap.
  if name in _LAZY:
    import importlib  # pylint: disable=g-import-not-at-top
    return getattr(importlib.import_module(f'sano_jax.{_LAZY[name]}'), name)
  if name == 'load_localizer':
    from sano_jax import rundir  # the run directory's one reader
    return rundir.load_localizer
  if name == 'load_exported':
    from sano_jax import export  # jax and numpy only
    return export.load_exported
  raise AttributeError(f'module sano_jax has no attribute {name!r}')
