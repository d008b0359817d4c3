"""The README's JAX example runs, and computes exactly what `load_localizer` computes.

The example is the python code block that follows the line `<!-- tested: tests/test_readme.py -->`
in README.md. It is run against a tiny run directory with random params (tests.helpers.
random_run_dir: no training), so two things are replaced textually before it is executed: the
demo's run directory 'workdirs/demo' by the temporary one, and the demo's image shape
(32, 32, 1) by the tiny config's (16, 16, 1). Nothing else of the example is changed.
"""
import os
import re

import numpy as np
import pytest

from sano_jax import methods, rundir
from tests.helpers import random_run_dir, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MARKER = '<!-- tested: tests/test_readme.py -->'
DEMO_WORKDIR = "'workdirs/demo'"
DEMO_SHAPE = '32, 32, 1'


def _readme() -> str:
  with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
    return f.read()


def readme_example() -> str:
  """The python code block right after the marker line."""
  text = _readme()
  assert text.count(MARKER) == 1, f'README.md must hold the line {MARKER} exactly once'
  after = text.split(MARKER, 1)[1]
  match = re.match(r'\s*```python\n(.*?)\n```', after, re.S)
  assert match, f'no ```python block right after {MARKER} in README.md'
  return match.group(1)


def _model_field(params):
  return methods.create(tiny_config()).field_fn(params)


@pytest.fixture(scope='module')
def run_dir(tmp_path_factory):
  return random_run_dir(str(tmp_path_factory.mktemp('readme') / 'run'), tiny_config(),
                        field=_model_field)


def test_readme_example_equals_load_localizer(run_dir):
  code = readme_example()
  size = int(tiny_config().data.image_size)
  # The two textual substitutions (module docstring); each must be there exactly once.
  for old in (DEMO_WORKDIR, DEMO_SHAPE):
    assert code.count(old) == 1, f'the README example no longer holds {old} exactly once'
  code = code.replace(DEMO_WORKDIR, repr(run_dir)).replace(DEMO_SHAPE, f'{size}, {size}, 1')
  namespace = {'__name__': 'readme_example'}
  exec(compile(code, 'README.md (tested block)', 'exec'), namespace)  # pylint: disable=exec-used

  images = namespace['images']
  assert images.shape == (4, size, size, 1)
  want_z, want_mask = rundir.load_localizer(run_dir)(images)
  z_map, mask = np.asarray(namespace['z_map']), np.asarray(namespace['mask'])
  assert z_map.shape == (4, size, size) and mask.dtype == np.bool_
  np.testing.assert_allclose(z_map, want_z, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(mask, np.asarray(want_mask))
  np.testing.assert_allclose(namespace['share'], np.asarray(want_mask).mean(axis=(1, 2)),
                             rtol=1e-6)
  # The z-map is not a constant (random params give a varying score): the comparison has teeth.
  assert np.ptp(z_map) > 1e-3


def test_readme_first_screen_has_the_two_setup_commands():
  """`make demo` and `make test` are in the first code block, before the first section."""
  first_screen = _readme().split('\n## ', 1)[0]
  block = re.search(r'```bash\n(.*?)\n```', first_screen, re.S)
  assert block, 'README.md has no bash block before its first section'
  commands = [line.split('#')[0].strip() for line in block.group(1).splitlines()]
  assert [c for c in commands if c] == ['make demo', 'make test']
