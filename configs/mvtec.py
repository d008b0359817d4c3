"""SANO on one category of a dataset in the MVTec AD layout (MVTec AD, MPDD, BTAD, VisA converted,
or benchmarks/kolektor.py's output):

  python run_train.py --config=configs/mvtec.py --workdir=DIR --config.data.root=PATH/bottle
  python run_eval.py --workdir=DIR

PATH/bottle holds train/good/ (healthy images), test/<good or defect type>/ and
ground_truth/<defect type>/<name>_mask.png. Everything else is configs/folder.py (its docstring):
the argument picks the stored image size, ``--config=configs/mvtec.py:128``; set
``--config.data.num_channels=1`` for grayscale sets and ``--config.data.mask_threshold=127`` when
the masks have anti-aliased edges.
"""
import ml_collections

from configs import folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  return folder.get_config(arg)
