"""Shared set-up of the command-line entry points: absl flags everywhere (run_train.py, run_eval.py,
run_demo.py, run_compare.py with ml_collections configs; `python -m sano_jax.predict` and
`python -m sano_jax.export` with flags of their own, `parse_args`)."""
import logging
import sys

from absl import logging as absl_logging


class _QuietOrbax(logging.Filter):
  """Orbax logs every save step by step at INFO: keep its warnings, drop its chatter."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def setup_logging() -> None:
  """absl INFO logs without Orbax's per-save chatter."""
  absl_logging.get_absl_handler().addFilter(_QuietOrbax())


def parse_flags(argv):
  """absl's flag parsing (`app.run(main, flags_parser=parse_flags)`), with one clear line instead of
  a traceback when a --config.a.b=value override names a field the config does not have."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:
    missing = str(e.args[0] if e.args else e).strip('\'"')
    bad = [a.split('=', 1)[0][2:] for a in argv[1:] if a.startswith('--config.')
           and missing in a.split('=', 1)[0].split('.')]
    where = ', '.join(bad) if bad else 'a --config.* override'
    print(f'error: unknown config field {where} (the config has no field {missing!r}); see the '
          'config file for the available fields', file=sys.stderr)
    sys.exit(2)


def parse_args(flag_values, argv, prog: str) -> None:
  """Parses `argv` (the arguments, without the program name) into `flag_values`, a module's own
  absl FlagValues (so that modules with the same flag names import together). An unknown flag, a
  bad value or a missing required flag: one 'error:' line and exit status 2."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  flag_values.unparse_flags()  # a second call (tests) starts from the defaults
  try:
    rest = flag_values([prog] + list(argv))
  except flags.Error as e:
    print(f'error: {e} (see {prog} --helpfull)', file=sys.stderr)
    sys.exit(2)
  if len(rest) > 1:
    print(f'error: unexpected arguments {rest[1:]} (see {prog} --helpfull)', file=sys.stderr)
    sys.exit(2)
