"""Test set-up: 4 simulated CPU devices (set before JAX is imported), quiet TensorFlow, a
derandomized hypothesis profile, and the `four_devices` marker.

* JAX_PLATFORMS defaults to cpu. Where it is set to an accelerator, tests marked
  ``@pytest.mark.four_devices`` (they hard-code the 4 simulated CPU devices) are skipped with the
  reason; subprocess tests force ``JAX_PLATFORMS=cpu`` in the child (``helpers.subprocess_env``).
* Hypothesis runs derandomized (a fixed seed per test: the same examples on every run, so CI never
  flakes on a newly drawn example). ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples.
* XLA:CPU compiles with LLVM's backend optimizations off (``helpers.xla_flags_for_tests``): the same
  HLO passes and maths, less tuned machine code; the tiny test programs compile ~40% faster.
  SANO_TEST_XLA_OPTIMIZE=1 keeps XLA's defaults.
* JAX's persistent compilation cache (``helpers.compilation_cache_dir``), also passed to the child
  processes (``helpers.subprocess_env``): a program compiled once per worker, not once per test.
* ``SANO_TEST_SUBPROCESS_TIMEOUT`` (seconds, default 600): the limit of each subprocess a test
  waits for (generous: a busy 2-core CI machine is slow, a hung child still ends).
"""
import os

import pytest

from tests.helpers import compilation_cache_env, xla_flags_for_tests  # pylint: disable=g-import-not-at-top

for _flag in xla_flags_for_tests(4):
  if _flag.split('=')[0] not in os.environ.get('XLA_FLAGS', ''):
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _flag).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

# The same programs compiled again in another test, a re-created jit or a child process are read
# back, not compiled.
for _key, _value in compilation_cache_env().items():
  os.environ.setdefault(_key, _value)

try:
  from hypothesis import HealthCheck, settings  # pylint: disable=g-import-not-at-top
except ImportError:  # pragma: no cover
  settings = None
if settings is not None:
  settings.register_profile('ci', derandomize=True, database=None, print_blob=True,
                            suppress_health_check=[HealthCheck.too_slow])
  settings.register_profile('explore', derandomize=False)
  settings.load_profile(os.environ.get('HYPOTHESIS_PROFILE', 'ci'))


def pytest_configure(config):
  config.addinivalue_line(
      'markers', 'four_devices: needs the 4 simulated CPU devices (skipped where JAX_PLATFORMS '
      'selects an accelerator or the device count differs)')


def pytest_runtest_setup(item):
  if item.get_closest_marker('four_devices') is None:
    return
  import jax  # pylint: disable=g-import-not-at-top
  platform, count = jax.default_backend(), jax.device_count()
  if platform != 'cpu' or count != 4:
    pytest.skip(f'needs 4 simulated CPU devices; JAX_PLATFORMS={os.environ.get("JAX_PLATFORMS")!r} '
                f'gives {count} {platform} device(s)')


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """A fake gs:// bucket (``tests/fake_gcs.py``): ``fake_gcs.url('run')`` is a gs:// URI that epath
  and Orbax serve from a local folder with an object store's semantics. The test runs in an empty
  working directory; a stray local 'gs:' folder there (code that bypassed epath with the URI
  string) fails it."""
  import fake_gcs as fake_gcs_lib  # pylint: disable=g-import-not-at-top
  cwd = tmp_path / 'cwd'
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  bucket = fake_gcs_lib.install(monkeypatch, str(tmp_path / 'gcs'))
  yield bucket
  stray = bucket.stray(str(cwd))
  assert not stray, f'code bypassed epath and wrote local paths made from gs:// URIs: {stray}'


@pytest.fixture(scope='session')
def textures_dir(tmp_path_factory):
  """A TFDS data_dir holding the embedded dataset at the tiny config's 16 px, built once per
  worker (tests that write to a data_dir build their own)."""
  from tests import helpers  # pylint: disable=g-import-not-at-top
  return helpers.build_textures(tmp_path_factory.mktemp('tfds'))


# Scheduling (`pytest -n 2 --dist loadscope --no-loadscope-reorder`, the Makefile's test target):
# each file's tests run on one worker (its module fixtures are built once), except the files in
# SPREAD, whose tests share no costly fixture and are dealt out one by one; files start heaviest
# first (measured with --durations on a 2-core machine), so that the two workers end together.
# (xdist's own loadgroup does not group under pytest 9: it renames nodeids through a private field.)
HEAVIEST_FIRST = (
    'test_kill_harness.py', 'test_calibration.py', 'test_methods_run.py', 'test_multihost.py',
    'test_methods.py', 'test_evaluate_rules.py', 'test_run_scripts.py', 'test_multiscale.py',
    'test_evaluate.py', 'test_multihost_eval.py', 'test_gcs_cycle.py', 'test_train.py',
    'test_localization.py', 'test_damaged_checkpoint.py', 'test_predict.py',
    'test_native_resolution.py', 'test_unet.py', 'test_train_options.py', 'test_run_train.py')
SPREAD = ('test_methods_run.py', 'test_methods.py')
# Tests sent with another file's unit, to the worker whose compilation cache already holds most of
# their programs: SANO's calibrated evaluation compiles the candidate maps test_calibration.py does
# (~55 s of compiling on 2 cores).
WITH = {'tests/test_methods_run.py::test_method_trains_evaluates_and_restores[sano]':
        'tests/test_calibration.py'}


def pytest_collection_modifyitems(config, items):
  del config
  rank = {name: i for i, name in enumerate(HEAVIEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: file order kept


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
  """Work units of one file each (of one test in SPREAD's files), sent in collection order."""
  from xdist.scheduler import LoadScopeScheduling  # pylint: disable=g-import-not-at-top

  class FileScheduling(LoadScopeScheduling):

    def _split_scope(self, nodeid):
      path = nodeid.split('::', 1)[0]
      if nodeid in WITH:
        return WITH[nodeid]
      return nodeid if os.path.basename(path) in SPREAD else path

  return FileScheduling(config, log)


@pytest.fixture(scope='session')
def tiny_run(tmp_path_factory, textures_dir):
  """(config, workdir): configs/tiny.py trained on the embedded data as `helpers.tiny_run_config`
  sets it up (10 steps), once per worker. Tests copy the workdir (`shutil.copytree`) and never
  write in it."""
  from sano_jax import train  # pylint: disable=g-import-not-at-top
  from tests import helpers  # pylint: disable=g-import-not-at-top
  config = helpers.tiny_run_config(textures_dir)
  workdir = str(tmp_path_factory.mktemp('tiny_run') / 'wd')
  train.train_and_evaluate(config, workdir)
  return config, workdir
