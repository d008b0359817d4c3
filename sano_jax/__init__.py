"""sano-jax: SANO, score-based anomaly localization, in JAX/Flax."""

__version__ = '0.1.0'


def __getattr__(name):
  # Lazy: `import sano_jax` stays cheap; `sano_jax.localize` etc. import on first use.
  if name in ('localize', 'load_localizer', 'ScoreStats', 'fit_score_stats'):
    from sano_jax import localize as _localize_mod
    if name == 'localize':
      return _localize_mod.localize
    return getattr(_localize_mod, name)
  raise AttributeError(name)
