"""Training on healthy images (SANO §3.2): data-parallel steps of the selected method's loss.

`train_step` is a pure function of (state, batch) shard_mapped over all devices (axis 'batch'):
gradients and metrics are averaged with `lax.pmean`, so one step on a global batch gives the same
params whatever the number of devices or hosts. The loss comes from `config.method`
(`sano_jax.methods`: SANO's denoising score matching, eq. 1, or a baseline's objective).
`train_and_evaluate(config, workdir)` is the whole run; preempted (SIGTERM, or JAX's multi-host
preemption notice), it finishes its step, saves a checkpoint there and returns, so that the same
command resumes it.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import time
from typing import Any, Iterator

from absl import logging
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, PartitionSpec as P

from sano_jax import checkpointing
from sano_jax import distributed
from sano_jax import methods
from sano_jax import preemption as preemption_lib
from sano_jax import summaries
from sano_jax.sharding import AXIS, make_mesh, replicate, shard_batch, to_host  # pylint: disable=unused-import


class TrainState(flax.struct.PyTreeNode):
  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32[2] key, so that it checkpoints as a plain array


def _adam(o) -> optax.GradientTransformation:
  """Adam (lr 2e-4 in the paper) with linear warm-up and global-norm clipping, from an optim block."""
  schedule = optax.linear_schedule(0.0, o.lr, max(1, o.warmup_steps)) if o.warmup_steps else o.lr
  parts = [optax.clip_by_global_norm(o.grad_clip)] if o.grad_clip else []
  if o.weight_decay:
    parts.append(optax.adamw(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps, weight_decay=o.weight_decay))
  else:
    parts.append(optax.adam(schedule, b1=o.beta1, b2=o.beta2, eps=o.eps))
  return optax.chain(*parts)


def create_optimizer(config, method: methods.Method | None = None) -> optax.GradientTransformation:
  """`config.optim`'s Adam; a method with several networks gets one per network (multi_transform)."""
  groups = method.optimizer_groups() if method is not None else None
  if groups is None:
    return _adam(config.optim)
  labels, optims = groups
  return optax.multi_transform({k: _adam(o if o is not None else config.optim)
                                for k, o in optims.items()}, labels)


def create_train_state(config, method: methods.Method, tx, rng: jax.Array) -> TrainState:
  """Initial state (on the host): params from `rng`, EMA params = params, step 0."""
  init_rng, state_rng = jax.random.split(rng)
  params = method.init(init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    ema_params=jax.tree.map(jnp.copy, params),  # own buffers: the state is donated
                    opt_state=tx.init(params), rng=state_rng)


def train_step(state: TrainState, batch: dict, *, method: methods.Method,
               tx: optax.GradientTransformation, config) -> tuple[TrainState, dict]:
  """One step of the method's loss on this device's batch['image'] [b,H,W,C], inside shard_map over
  'batch'; metrics are the batch means of every loss term, plus the gradient norm."""
  images = batch['image']
  step_rng = jax.random.fold_in(state.rng, state.step)
  noise_rng, dropout_rng = jax.random.split(step_rng)
  device = jax.lax.axis_index(AXIS)
  dropout_rng = jax.random.fold_in(dropout_rng, device)
  # Global ids of this device's examples: the same on 1 device or many, so the noise is too.
  ids = device * images.shape[0] + jnp.arange(images.shape[0])

  def loss_fn(params):
    terms = method.losses(params, method.network_input(images), ids, noise_rng, train=True,
                          dropout_rng=dropout_rng)
    terms = {k: jnp.mean(v) for k, v in terms.items()}
    return terms['loss'], terms

  (_, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  terms = jax.lax.pmean(terms, AXIS)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  rate = config.training.ema_rate
  ema_params = jax.tree.map(lambda e, p: rate * e + (1.0 - rate) * p, state.ema_params, params)
  new_state = state.replace(step=state.step + 1, params=params, ema_params=ema_params,
                            opt_state=opt_state)
  return new_state, {**terms, 'grad_norm': optax.global_norm(grads)}


def train_steps(state: TrainState, batches: dict, **kwargs) -> tuple[TrainState, dict]:
  """Several steps in one device call: lax.scan of `train_step` over batches' leading axis [k, b, ...]."""
  # Unrolled: XLA:CPU ran the rolled loop ~50x slower (demo config, 2 steps per call: 44 s/step
  # rolled vs 0.9 s unrolled; benchmarks/README.md). The loop is short (k steps), so unrolling only
  # costs compile time (k copies of the step).
  state, metrics = jax.lax.scan(lambda s, b: train_step(s, b, **kwargs), state, batches, unroll=True)
  return state, jax.tree.map(lambda m: m[-1], metrics)


def eval_step(params, batch: dict, rng: jax.Array, *, method: methods.Method) -> dict:
  """Sum and count of the per-example validation objective ('select', else 'loss') on a batch
  (padded examples masked by 'valid').

  The randomness of example i depends only on (rng, batch['index'][i]), so the validation loss is
  the same number whatever the batch size or device count."""
  terms = method.losses(params, method.network_input(batch['image']), batch['index'], rng,
                        train=False)
  per_example = terms.get('select', terms['loss'])
  valid = batch['valid'].astype(jnp.float32)
  return jax.lax.psum({'loss_sum': jnp.sum(per_example * valid), 'count': jnp.sum(valid)}, AXIS)


def make_steps(config, method: methods.Method, tx, mesh: Mesh, *, steps_per_call: int | None = None):
  """(train, evaluate): `train_step` (scanned when steps_per_call > 1) and `eval_step`, each
  shard_mapped over the mesh's 'batch' axis and jitted; the train state is replicated and donated,
  batches are sharded along their batch axis ([k, B, ...] for k steps per call).
  steps_per_call: k (default: config.training.steps_per_call).

  This is pmap's data parallelism written with jit + shard_map, which is how jax.pmap itself is
  implemented since JAX 0.8 and what works across hosts with global arrays."""
  k = config.training.steps_per_call if steps_per_call is None else steps_per_call
  multi = k > 1
  step_fn = functools.partial(train_steps if multi else train_step, method=method, tx=tx,
                              config=config)
  batch_spec = P(None, AXIS) if multi else P(AXIS)
  train = jax.jit(jax.shard_map(step_fn, mesh=mesh, in_specs=(P(), batch_spec), out_specs=(P(), P()),
                                check_vma=False), donate_argnums=(0,))
  evaluate = jax.jit(jax.shard_map(
      functools.partial(eval_step, method=method), mesh=mesh,
      in_specs=(P(), P(AXIS), P()), out_specs=P(), check_vma=False))
  return train, evaluate


# ----------------------------------------------------------------------------------------------------
# The run.


def check_config(config, num_devices: int) -> None:
  """Clear errors for configs that cannot run."""
  t = config.training
  if t.batch_size % num_devices:
    raise ValueError(f'training.batch_size={t.batch_size} is not divisible by the {num_devices} devices '
                     f'({jax.process_count()} process(es) x {jax.local_device_count()} local devices); '
                     f'use a multiple of {num_devices}, e.g. --config.training.batch_size='
                     f'{max(1, t.batch_size // num_devices) * num_devices}')
  k = t.steps_per_call
  for name in ('log_every', 'eval_every', 'checkpoint_every', 'num_train_steps'):
    if getattr(t, name) % k:
      raise ValueError(f'training.{name}={getattr(t, name)} must be a multiple of '
                       f'training.steps_per_call={k}')
  if config.model.dtype not in ('float32', 'bfloat16'):
    raise ValueError(f"model.dtype={config.model.dtype!r}: use 'float32' or 'bfloat16'")
  if config.eval.batch_size % num_devices:
    raise ValueError(f'eval.batch_size={config.eval.batch_size} is not divisible by the {num_devices} '
                     'devices; use a multiple.')
  name = methods.method_name(config)  # a clear error for an unknown method
  method_cls = methods.method_class(config)
  for key, lr in method_cls.learning_rates(config).items():
    if not lr > 0:
      raise ValueError(f'{key}={lr}: the learning rate must be > 0')
  o = config.optim  # (None, like 0, turns warm-up and clipping off)
  if not (o.warmup_steps or 0) >= 0:
    raise ValueError(f'optim.warmup_steps={o.warmup_steps} must be >= 0 (0: no warm-up)')
  if not (o.grad_clip or 0) >= 0:
    raise ValueError(f'optim.grad_clip={o.grad_clip} must be >= 0 (the largest global gradient '
                     'norm; 0: no clipping)')
  if not 0.0 <= float(config.training.ema_rate) < 1.0:
    raise ValueError(f'training.ema_rate={config.training.ema_rate} must lie in [0, 1)')
  block, levels = method_cls.downsampling(config)
  crop = config.data.get('crop_size')
  sizes = {'data.image_size': config.data.image_size}
  if crop is not None:
    if not 0 < crop <= config.data.image_size:
      raise ValueError(f'data.crop_size={crop} must lie in (0, data.image_size='
                       f'{config.data.image_size}]: crops are cut from the stored images')
    sizes['data.crop_size'] = crop
  for key, size in sizes.items():
    if size % (2 ** levels):
      raise ValueError(f'{key}={size} is not divisible by 2^{levels} '
                       f'({block}.ch_mult={tuple(getattr(config, block).ch_mult)} of method {name!r})')
  tile = config.get('localize', {}).get('tile_size')
  if tile is not None and (tile % (2 ** levels) or not 0 <= config.localize.tile_overlap < tile):
    raise ValueError(f'localize.tile_size={tile} must be divisible by 2^{levels} and exceed '
                     f'localize.tile_overlap={config.localize.tile_overlap} >= 0')


def _stack_steps(it: Iterator[dict], k: int) -> Iterator[dict]:
  """Group k batches [ndev, b, ...] into [ndev, k, b, ...] for `train_steps`."""
  while True:
    group = [next(it) for _ in range(k)]
    yield {key: np.stack([g[key] for g in group], axis=1) for key in group[0]}


def _calls(it: Iterator[dict], k: int, align: int) -> Iterator[tuple[int, dict]]:
  """(steps, host batch) of each device call: `align` single steps ([ndev, b, ...]), then calls of
  k steps ([ndev, k, b, ...] when k > 1)."""
  for _ in range(align):
    yield 1, next(it)
  for batch in (_stack_steps(it, k) if k > 1 else it):
    yield k, batch


def _device_batches(it: Iterator[tuple[int, dict]], mesh: Mesh,
                    depth: int = 2) -> Iterator[tuple[int, dict]]:
  """Shard the host batches of `_calls` onto the mesh `depth` calls ahead, so transfers overlap
  compute."""
  queue = collections.deque()
  for n, batch in it:
    queue.append((n, shard_batch(batch, mesh, stacked=n > 1)))
    if len(queue) > depth:
      yield queue.popleft()
  while queue:
    yield queue.popleft()


def evaluate_loss(evaluate, params, val_source, config, mesh: Mesh) -> float:
  """Mean validation loss over the (first `training.eval_batches` batches of the) healthy split."""
  from sano_jax import input_pipeline
  it = input_pipeline.eval_iterator(
      val_source, global_batch_size=config.eval.batch_size, num_local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      dtype=jnp.dtype(config.model.dtype))
  rng = jax.random.PRNGKey(config.seed + 1)
  total, count = 0.0, 0.0
  for i, batch in enumerate(it):
    if 0 <= config.training.eval_batches <= i:
      break
    arrays = shard_batch({k: batch[k] for k in ('image', 'valid', 'index')}, mesh)
    out = to_host(evaluate(params, arrays, rng))
    total, count = total + float(out['loss_sum']), count + float(out['count'])
  return total / max(count, 1.0)


def finished(state: TrainState, config) -> bool:
  """Whether `state` (what `train_and_evaluate` returned) reached config's num_train_steps: False
  after a preemption, when evaluating it would report a half-trained model."""
  return int(state.step) >= int(config.training.num_train_steps)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       train_source=None, val_source=None) -> TrainState:
  """Train `config` in `workdir`, resuming from its latest checkpoint; returns the final host state.

  Sources default to `input_pipeline.get_source(config, split)`; tests may pass in-memory ones.
  Preempted (`sano_jax.preemption`), it finishes the current step, saves a checkpoint at it on all hosts,
  logs that and returns that state; called again, it resumes there."""
  check_config(config, jax.device_count())
  preemption = preemption_lib.Preemption()
  preemption.start()
  try:
    return _train(config, workdir, train_source, val_source, preemption)
  finally:
    preemption.stop()


def _train(config, workdir: str, train_source, val_source,
           preemption: preemption_lib.Preemption) -> TrainState:
  """The body of `train_and_evaluate`, with its `preemption` listening."""
  from sano_jax import input_pipeline
  num_devices = jax.device_count()
  is_chief = jax.process_index() == 0
  checkpointing.check_same_model(config, workdir)
  checkpointing.check_same_data(config, workdir)
  if is_chief:
    checkpointing.save_config(config, workdir)

  train_source = train_source or input_pipeline.get_source(config, config.data.train_split)
  val_source = val_source or input_pipeline.get_source(config, config.data.validation_split)

  method = methods.create(config)
  tx = create_optimizer(config, method)
  state = create_train_state(config, method, tx, jax.random.PRNGKey(config.seed))
  # Orbax's manager runs the first cross-process collective: meet first (model init and data
  # loading take each process its own time; gloo gives a latecomer only 30 s to join it).
  distributed.barrier('sano_train_start')
  store = checkpointing.CheckpointStore(workdir, keep=config.training.keep_checkpoints)
  if store.latest_step() is not None:
    # The newest intact checkpoint (damaged ones are logged and skipped); a clear error for a
    # checkpoint of another model, or when none is intact.
    state = store.restore_latest(jax.device_get(state))
    logging.info('resumed from %s at step %d', workdir, int(state.step))
  start_step = int(state.step)
  log = summaries.MetricsLog(workdir, is_chief, start_step)
  if is_chief:
    n_params = sum(x.size for x in jax.tree.leaves(state.params))
    logging.info('method %s: %.2fM params; %d devices; global batch %d', method.name,
                 n_params / 1e6, num_devices, config.training.batch_size)

  mesh = make_mesh()
  train_fn, eval_fn = (_compile_then_meet(f, f'sano_compiled_{name}')
                       for f, name in zip(make_steps(config, method, tx, mesh), ('train', 'eval')))
  state = replicate(state, mesh)
  k = config.training.steps_per_call
  # A checkpoint of a run with another steps_per_call (or preempted at any step) may lie between
  # multiples of k: single steps up to the next multiple, so that the logging, evaluation and
  # checkpoint steps (multiples of k) and num_train_steps are met exactly.
  align = -start_step % k
  train_fns = {k: train_fn}
  if align:
    train_fns[1] = _compile_then_meet(make_steps(config, method, tx, mesh, steps_per_call=1)[0],
                                      'sano_compiled_train_single')
    logging.info('step %d is not a multiple of training.steps_per_call=%d: %d single step(s) first',
                 start_step, k, align)
  batches = input_pipeline.train_iterator(
      train_source, global_batch_size=config.training.batch_size, seed=config.seed,
      start_step=start_step, num_local_devices=jax.local_device_count(),
      process_index=jax.process_index(), process_count=jax.process_count(),
      dtype=jnp.dtype(config.model.dtype), worker_count=config.data.worker_count,
      crop_size=config.data.get('crop_size'), flips=config.data.get('random_flips', False))
  batches = _device_batches(_calls(batches, k, align), mesh)

  t = config.training
  eval_params = (lambda s: s.ema_params) if config.localize.use_ema else (lambda s: s.params)
  progress = summaries.progress(total=t.num_train_steps, unit='step', initial=start_step,
                               enabled=is_chief, mininterval=2.0)
  last_good = store.latest_step()
  tic, step, last_logged = time.perf_counter(), start_step, start_step
  run_start = tic
  in_flight = None  # the metrics of the last dispatched call: the bar counts COMPLETED steps
  in_flight_steps = 0  # and its number of steps
  stopped = preemption.requested
  if stopped:  # during set-up: nothing new to save
    logging.info('preempted before the first step (step %d): nothing new to save; run the same '
                 'command again to resume', start_step)
  try:
    while step < t.num_train_steps and not stopped:
      size, batch = next(batches)
      state, metrics = train_fns[size](state, batch)
      step += size
      preempted = preemption.reached(step, size)
      if in_flight is not None:  # one call stays queued behind this one, so dispatch still overlaps
        jax.block_until_ready(in_flight)
        progress.update(in_flight_steps)
      in_flight, in_flight_steps = metrics, size
      if step == start_step + size:  # the first call compiles: keep it out of images/s
        jax.block_until_ready(metrics)
        log.write(step, {'perf/compile_and_first_step_s': time.perf_counter() - tic})
        tic, last_logged = time.perf_counter(), step
      if step % t.log_every == 0 or step % t.checkpoint_every == 0 or step == t.num_train_steps:
        loss = float(to_host(metrics['loss']))
        if not math.isfinite(loss):
          kept = (f'The last good checkpoint (step {last_good}) is kept in {workdir}/checkpoints.'
                  if last_good is not None else 'No checkpoint was written.')
          raise FloatingPointError(
              f'non-finite loss ({loss}) at step {step}; stopped without saving. {kept} Lower '
              '--config.optim.lr, enable --config.optim.grad_clip, or check the data for NaN/inf.')
        if step % t.log_every == 0 or step == t.num_train_steps:
          scalars = {f'train/{name}': v for name, v in to_host(metrics).items()}
          scalars['perf/wall_s'] = time.perf_counter() - run_start
          n, elapsed = step - last_logged, time.perf_counter() - tic
          if n > 0:  # no timed step since the last log (e.g. the compile step): no rate to report
            scalars.update({'perf/steps_per_s': n / elapsed,
                            'perf/images_per_s': n * t.batch_size / elapsed})
            progress.set_postfix(loss=f'{loss:.4f}', img_s=f'{n * t.batch_size / elapsed:.1f}')
          log.write(step, scalars)
          tic, last_logged = time.perf_counter(), step
      if step % t.eval_every == 0 or step == t.num_train_steps:
        val_loss = evaluate_loss(eval_fn, eval_params(state), val_source, config, mesh)
        log.write(step, {'validation/loss': val_loss})
        host = to_host(state)
        store.save_best(step, {'params': host.params, 'ema_params': host.ema_params}, val_loss)
        tic, last_logged = time.perf_counter(), step
      if step % t.checkpoint_every == 0 or step == t.num_train_steps:
        store.save(step, to_host(state))
        last_good = step
        tic, last_logged = time.perf_counter(), step
      if preempted:
        if last_good != step:
          store.save(step, to_host(state))
          last_good = step
        logging.info('preempted at step %d: saved a checkpoint at step %d in %s; run the same '
                     'command again to resume', step, step, os.path.join(workdir, checkpointing.CHECKPOINTS_DIR))
        stopped = True
    if in_flight is not None:
      jax.block_until_ready(in_flight)
      progress.update(in_flight_steps)
  finally:
    progress.close()
    log.close()
    store.close()
  return to_host(state)


def _compile_then_meet(fn, name: str):
  """The jitted `fn`; with several processes, its first call compiles it ahead of time, then waits
  for the other processes (`distributed.barrier`) before running its collectives: compiling takes
  each process its own time, and gloo gives a latecomer only 30 s to join. Later calls reuse the
  compilation."""
  if jax.process_count() == 1:
    return fn
  compiled = [False]

  def call(*args):
    if not compiled[0]:
      fn.lower(*args).compile()  # cached: the call below does not compile again
      distributed.barrier(name)
      compiled[0] = True
    return fn(*args)
  return call
