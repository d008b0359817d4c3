"""Test set-up: 4 simulated CPU devices (set before JAX is imported), quiet TensorFlow, a
derandomized hypothesis profile, and the `four_devices` marker.

* JAX_PLATFORMS defaults to cpu. Where it is set to an accelerator, tests marked
  ``@pytest.mark.four_devices`` (they hard-code the 4 simulated CPU devices) are skipped with the
  reason; subprocess tests force ``JAX_PLATFORMS=cpu`` in the child (``helpers.subprocess_env``).
* Hypothesis runs derandomized (a fixed seed per test: the same examples on every run, so CI never
  flakes on a newly drawn example). ``HYPOTHESIS_PROFILE=explore`` draws fresh random examples.
* ``SANO_TEST_SUBPROCESS_TIMEOUT`` (seconds, default 600): the limit of each subprocess a test
  waits for (generous: a busy 2-core CI machine is slow, a hung child still ends).
"""
import os

import pytest

_FLAG = '--xla_force_host_platform_device_count=4'
if _FLAG not in os.environ.get('XLA_FLAGS', ''):
  os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' ' + _FLAG).strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

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
