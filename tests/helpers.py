"""Shared test fixtures: tiny in-memory data sources of the data contract."""
import numpy as np


def grating_source(n: int, size: int = 16, channels: int = 1, seed: int = 0, subject_offset: int = 0):
  """n smooth images (random-phase gratings) as a list of contract dicts: an easy healthy distribution."""
  rng = np.random.RandomState(seed)
  yy, xx = np.mgrid[:size, :size] / size
  out = []
  for i in range(n):
    f, phase, angle = rng.uniform(0.5, 2), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    img = 0.5 + 0.4 * np.sin(2 * np.pi * f * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = np.repeat(img[..., None], channels, -1)
    out.append({'image': (255 * img).round().astype(np.uint8),
                'mask': np.zeros((size, size, 1), np.uint8),
                'subject': str(subject_offset + i // 4), 'name': f'img{i}'})
  return out


def split_slices(config, **counts) -> dict:
  """`evaluate`'s source arguments for each `split=n` of `counts` ({split}_source): n evenly spaced
  examples of that split of the config's dataset, as an in-memory source (a list)."""
  from sano_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  out = {}
  for split, n in counts.items():
    source = input_pipeline.get_source(config, split)
    out[f'{split}_source'] = [source[int(i)] for i in
                              np.linspace(0, len(source) - 1, n).round().astype(int)]
  return out


# One-level nets for properties that do not depend on the depth (`tiny_config(**ONE_LEVEL)`): every
# kind of layer stays (convolutions, GroupNorm, the U-Net's middle attention block at 16 px, the
# codebook, the discriminator) at about half the compile time of the tiny config's two levels.
ONE_LEVEL = {'model.ch_mult': (1,), 'model.attn_resolutions': (), 'autoencoder.ch_mult': (1,)}


def tiny_config(**overrides):
  from configs import tiny
  config = tiny.get_config()
  config.data.dataset = 'in-memory'
  for key, value in overrides.items():
    node = config
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return config


def random_values(shapes, seed: int = 0, scale: float = 0.05):
  """N(0, scale^2) arrays of the shapes and dtypes in the pytree `shapes` (jax.eval_shape of an
  init): random weights without compiling init (XLA:CPU takes ~30 s for a jitted U-Net init), every
  weight nonzero, so the output is too."""
  import jax  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def random_run_dir(workdir: str, config, *, step: int = 1, stats_size: int | None = None,
                   field=lambda params: (lambda x: -x)):
  """A run directory as load_localizer and predict read it (config.json, best/<step> with random
  params, the inference bundle), without training or compiling the model: the statistics are
  fitted with `field(params)` (default: a stand-in score -x) on 4 random images of `stats_size`."""
  from sano_jax import checkpointing, rundir, score_stats  # pylint: disable=g-import-not-at-top
  checkpointing.save_config(config, workdir)
  params = random_params(config)
  store = checkpointing.CheckpointStore(workdir)
  store.save_best(step, {'params': params, 'ema_params': params}, 0.0)
  store.close()
  size = stats_size or config.data.image_size
  batch = np.random.default_rng(1).uniform(size=(4, size, size, config.data.num_channels))
  stats = score_stats.fit_score_stats(field(params), [batch.astype(np.float32)],
                                       smoothing_sigma=float(config.localize.smoothing_sigma))
  rundir.save(workdir, config=config, stats=stats, step=step)
  return workdir


def random_params(config, seed: int = 0, scale: float = 0.05):
  """`random_values` of the config's U-Net params."""
  import jax  # pylint: disable=g-import-not-at-top
  from sano_jax import models  # pylint: disable=g-import-not-at-top
  model = models.create_model(config)
  size, c = config.data.image_size, config.data.num_channels
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), np.zeros((1, size, size, c), np.float32),
                          np.ones((1,), np.float32))['params']
  return random_values(shapes, seed, scale)


def compilation_cache_env(subdir: str = '') -> dict:
  """JAX's persistent compilation cache in `compilation_cache_dir()`/`subdir`, every compilation
  kept, however short (flax's eager init compiles op by op), as environment variables."""
  import os  # pylint: disable=g-import-not-at-top
  return {'JAX_COMPILATION_CACHE_DIR': os.path.join(compilation_cache_dir(), subdir),
          'JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS': '0',
          'JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES': '0'}


def xla_flags_for_tests(local_devices: int) -> list:
  """XLA_FLAGS of a test process on CPU: `local_devices` simulated devices, and LLVM's backend
  optimizations off unless SANO_TEST_XLA_OPTIMIZE=1 (XLA's HLO passes still run: the programs
  compute the same maths; measured on 2 cores, a multiscale + 4-device-step sample took 52 s of
  CPU instead of 90, nearly all of it compiling)."""
  import os  # pylint: disable=g-import-not-at-top
  flags = [f'--xla_force_host_platform_device_count={local_devices}']
  if os.environ.get('SANO_TEST_XLA_OPTIMIZE') != '1':
    flags += ['--xla_backend_optimization_level=0', '--xla_llvm_disable_expensive_passes=true']
  return flags


def compilation_cache_dir() -> str:
  """This pytest process's folder of JAX's persistent compilation cache: one per xdist worker (JAX
  writes an entry in place, so a concurrent reader of a shared folder could see half of it), under
  SANO_TEST_COMPILATION_CACHE (default .pytest_cache/d/sano_jax_compilation_cache: a later run on
  this checkout starts warm; `pytest --cache-clear` empties it). Entries are keyed by the program,
  the JAX version and the flags: never reused wrongly."""
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  base = os.environ.get('SANO_TEST_COMPILATION_CACHE') or os.path.join(
      root, '.pytest_cache', 'd', 'sano_jax_compilation_cache')
  return os.path.join(base, os.environ.get('PYTEST_XDIST_WORKER', 'main'))


def subprocess_timeout() -> float:
  """Seconds a test waits for a subprocess: SANO_TEST_SUBPROCESS_TIMEOUT, default 600 (generous on
  a busy 2-core machine; a hung child still ends the test)."""
  import os  # pylint: disable=g-import-not-at-top
  return float(os.environ.get('SANO_TEST_SUBPROCESS_TIMEOUT', '600'))


def subprocess_env(local_devices: int = 4, cache_subdir: str = '', **extra) -> dict:
  """The environment of a child Python that runs JAX: CPU only with `local_devices` simulated
  devices, whatever JAX_* or XLA_FLAGS the parent has (e.g. JAX_PLATFORMS=cuda), plus `extra`.

  The child shares this worker's persistent compilation cache (tests/conftest.py), every
  compilation kept; children that run at the same time name a `cache_subdir` each (JAX writes an
  entry in place: a concurrent reader could see half of it)."""
  import os  # pylint: disable=g-import-not-at-top
  env = {k: v for k, v in os.environ.items() if not k.startswith('JAX_') and k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', XLA_FLAGS=' '.join(xla_flags_for_tests(local_devices)),
             TF_CPP_MIN_LOG_LEVEL='3', PYTHONUNBUFFERED='1', **compilation_cache_env(cache_subdir))
  env.update({k: str(v) for k, v in extra.items()})
  return env


def read_log(path, tail: int = 4000) -> str:
  """The end of a subprocess's log file ('' if it does not exist yet)."""
  try:
    with open(path, errors='replace') as f:
      return f.read()[-tail:]
  except FileNotFoundError:
    return ''


# ------------------------------------------------------------------------------------------------
# run_train.py in a child process (kill, preemption and resume tests).


def run_train_process(workdir, data_dir, *extra, log):
  """run_train.py on configs/tiny.py in a child on 4 simulated CPU devices, its output to the file
  `log` (a pipe that nobody reads while the test polls could fill and block the child)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, os.path.join(root, 'run_train.py'), '--config=configs/tiny.py',
         f'--workdir={workdir}', f'--config.data.data_dir={data_dir}', *extra]
  with open(log, 'w') as f:  # the child keeps its own copy of the descriptor
    return subprocess.Popen(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT,
                            env=subprocess_env(4))


def finish_process(proc, log):
  """Waits for the child (generous, configurable limit); returns (returncode, its whole output)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  try:
    proc.wait(timeout=subprocess_timeout())
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    pytest.fail(f'{proc.args[1]} did not finish in {subprocess_timeout():.0f} s '
                f'(SANO_TEST_SUBPROCESS_TIMEOUT):\n{read_log(log)}')
  return proc.returncode, read_log(log, tail=10**7)


def wait_for(condition, proc, log, what: str, poll_s: float = 0.02) -> None:
  """Polls `condition()` while the child runs; fails (killing it) if it exits first or the
  subprocess limit passes."""
  import time  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + subprocess_timeout()
  while not condition():
    if proc.poll() is not None:
      pytest.fail(f'the child exited ({proc.returncode}) before {what}:\n{read_log(log)}')
    if time.monotonic() > deadline:
      proc.kill()
      proc.wait()
      pytest.fail(f'no {what} after {subprocess_timeout():.0f} s:\n{read_log(log)}')
    time.sleep(poll_s)


def build_textures(data_dir: str) -> str:
  """The embedded dataset (sano_textures/brick) at the tiny config's 16 px, built in `data_dir`."""
  from sano_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  config = tiny_config()
  config.data.dataset = 'sano_textures/brick'
  config.data.data_dir = str(data_dir)
  input_pipeline.get_source(config, 'train')
  return str(data_dir)


def assert_same_checkpoint(workdir_a, workdir_b, step: int) -> None:
  """The train states saved at `step` in two run directories are equal bit for bit."""
  import jax  # pylint: disable=g-import-not-at-top
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from sano_jax import checkpointing  # pylint: disable=g-import-not-at-top
  trees = []
  for wd in (workdir_a, workdir_b):
    store = checkpointing.CheckpointStore(str(wd))
    assert store.latest_step() == step, (wd, store.latest.all_steps())
    trees.append(store.latest.restore(step, args=ocp.args.StandardRestore()))
    store.close()
  a, b = (jax.tree_util.tree_flatten_with_path(t)[0] for t in trees)
  assert [p for p, _ in a] == [p for p, _ in b]
  for (path, x), (_, y) in zip(a, b):
    np.testing.assert_array_equal(x, y, err_msg=jax.tree_util.keystr(path))


# ------------------------------------------------------------------------------------------------
# run_train.py started again and again (tests/test_kill_harness.py).

_FAST_CHILD = """\
import runpy, sys
sys.modules['flax.metrics.tensorboard'] = None  # unimportable: MetricsLog skips TensorBoard
sys.argv = sys.argv[1:]  # [run_train.py, flags...]
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def run_train_fast_process(workdir, data_dir, *extra, log):
  """`run_train_process`, quicker to start many times over: it writes no TensorBoard files
  (importing TensorFlow for them costs 10-25 s a start on a busy 2-core machine; metrics.jsonl is
  still written). Like every child it shares the worker's compilation cache (`subprocess_env`): a
  later start traces the model but compiles nothing. The child is run_train.py itself, run as
  __main__ in the Popen's own process (a signal to it reaches the training process)."""
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  cmd = [sys.executable, '-c', _FAST_CHILD, os.path.join(root, 'run_train.py'),
         '--config=configs/tiny.py', f'--workdir={workdir}', f'--config.data.data_dir={data_dir}',
         *extra]
  with open(log, 'w') as f:  # the child keeps its own copy of the descriptor
    return subprocess.Popen(cmd, cwd=root, stdout=f, stderr=subprocess.STDOUT,
                            env=subprocess_env(4))


def tiny_run_config(data_dir, steps: int = 10, **overrides):
  """configs/tiny.py on its embedded data (built in `data_dir` when absent) for a short training
  run: `steps` steps, logged every steps // 2, evaluated (one validation batch) and checkpointed
  at the end, EMA rate 0.5 (so that a few steps move the EMA params away from the zero-output
  init), no figures; then `overrides` as in `tiny_config` ('block.field': value)."""
  from configs import tiny  # pylint: disable=g-import-not-at-top
  return tiny_config(**{
      'data.dataset': tiny.get_config().data.dataset, 'data.data_dir': str(data_dir),
      'training.num_train_steps': steps, 'training.eval_every': steps,
      'training.checkpoint_every': steps, 'training.log_every': max(1, steps // 2),
      'training.eval_batches': 1, 'training.ema_rate': 0.5, 'eval.num_figures': 0, **overrides})


# ------------------------------------------------------------------------------------------------
# Two processes of one jax.distributed job on localhost (tests/test_multihost_eval.py).


def free_port() -> int:
  """A TCP port free now on 127.0.0.1 (released again: another program may take it first)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def run_process_pair(argv, log_prefix, *, local_devices: int = 2, attempts: int = 3,
                     **env) -> list[str]:
  """Runs `argv` (a Python script and its arguments) as processes 0 and 1 of one jax.distributed
  job on a free localhost port (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID; CPU,
  `local_devices` simulated devices each, `env` added, each process with its own folder of the
  compilation cache), their output to the files LOG_PREFIX.process{i}.attempt{k}.log; returns both
  outputs once both exited 0.

  The script prints 'process I initialized' once it has joined. The port may be taken between
  picking and binding it: a pair that fails before both printed that is started again on a new
  port (at most `attempts` times); a failure after both joined is reported (pytest.fail). One
  failing process gets the other killed (it would wait for it forever); the pair shares one
  generous limit (`subprocess_timeout`)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import time  # pylint: disable=g-import-not-at-top
  import pytest  # pylint: disable=g-import-not-at-top
  deadline = time.monotonic() + subprocess_timeout()
  for attempt in range(attempts):
    logs = [f'{log_prefix}.process{i}.attempt{attempt}.log' for i in range(2)]
    port, procs = free_port(), []
    try:
      for i, log in enumerate(logs):
        with open(log, 'w') as f:  # the child keeps its own copy of the descriptor
          procs.append(subprocess.Popen(
              [sys.executable, *map(str, argv)], stdout=f, stderr=subprocess.STDOUT,
              env=subprocess_env(local_devices, cache_subdir=f'process{i}',
                                 JAX_COORDINATOR_ADDRESS=f'127.0.0.1:{port}',
                                 JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, **env)))
      while any(p.poll() is None for p in procs):
        if any(p.poll() not in (None, 0) for p in procs):
          break
        if time.monotonic() > deadline:
          pytest.fail(f'the two processes did not finish in {subprocess_timeout():.0f} s '
                      '(SANO_TEST_SUBPROCESS_TIMEOUT):\n' + '\n'.join(read_log(l) for l in logs))
        time.sleep(0.2)
    finally:
      for p in procs:
        if p.poll() is None:
          p.kill()
        p.wait()
    outs = [read_log(l, tail=10**7) for l in logs]
    codes = [p.returncode for p in procs]
    if codes == [0, 0]:
      return outs
    if all(f'process {i} initialized' in o for i, o in enumerate(outs)):
      break  # both joined: a real failure
  pytest.fail(f'the pair failed (return codes {codes}, attempt {attempt + 1} of {attempts}):\n'
              + '\n'.join(f'--- process {i}:\n{o[-4000:]}' for i, o in enumerate(outs)))


def audit_writes(root: str) -> list:
  """The paths (relative to `root`, outside checkpoints/ and best/) that this process writes from
  now on, in a list that grows as it runs (a `sys.addaudithook`: opened for writing, renamed,
  removed, made or removed as folders)."""
  import os  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  root = os.path.realpath(root)
  wrote = []
  write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

  def hook(event, args):
    if event == 'open':
      path, mode, flags = args
      writes = (any(c in mode for c in 'wax+') if isinstance(mode, str)
                else bool((flags or 0) & write_flags))
      paths = [path] if writes else []
    elif event in ('os.mkdir', 'os.rename', 'os.remove', 'os.rmdir', 'shutil.rmtree'):
      paths = list(args[:2]) if event == 'os.rename' else [args[0]]
    else:
      return
    for p in paths:
      if not isinstance(p, (str, bytes, os.PathLike)):
        continue
      rel = os.path.relpath(os.path.realpath(os.fsdecode(p)), root)
      if rel != '..' and not rel.startswith('..' + os.sep) and \
          rel.split(os.sep)[0] not in ('checkpoints', 'best'):
        wrote.append(rel)

  sys.addaudithook(hook)
  return wrote
