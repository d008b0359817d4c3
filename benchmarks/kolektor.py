r"""KolektorSDD (YOLO-seg copy) -> the MVTec AD layout that `configs/folder.py` reads.

The development set of real defects (the licence, CC BY-NC-SA 4.0, keeps it out of this
repository). Get a copy of github.com/stoy95536/KolektorSDD_Yolov8_Datasets (399 grayscale photos of
commutators, 500 x ~1260 px, in Datasets/images/{train,val}/NNN.jpg, with YOLO-seg labels
Datasets/labels/{train,val}/NNN.txt: one polygon per line, `class x1 y1 x2 y2 ...` normalized to
[0, 1]; an empty file = defect-free), then

  PYTHONPATH=. .venv/bin/python benchmarks/kolektor.py --src=KolektorSDD_Yolov8_Datasets \
      --out=data/kolektor

writes

  OUT/train/good/NNN.jpg          defect-free, for training and validation (the source files)
  OUT/test/good/NNN.jpg           defect-free test share (a fraction chosen by a fixed seed)
  OUT/test/crack/NNN.jpg          every image with a polygon
  OUT/ground_truth/crack/NNN_mask.png   0/255 masks at the image's size

The copy holds 16 images twice under two numbers (000-007 = 143-150, 096-103 = 223-230; two of the
pairs are defective, their two label files differ slightly): each image is kept once, under its
first name, with the union of its copies' polygons, so that no test image has a twin in train/good
(the folder builder refuses such a pair). That leaves 383 images: 333 defect-free, 50 with cracks.

Polygons are rasterized with scikit-image: the interior (`skimage.draw.polygon`) plus the outline
(`polygon_perimeter`), because the labels are outlines of pixel masks traced through boundary pixel
centres and a 1-2 px crack has no interior. The original set's 50 physical commutators are not
recoverable from the renumbered files, so every image is its own subject.
"""
from __future__ import annotations

import argparse
import hashlib
import os
import shutil

import numpy as np

GOOD, DEFECT = 'good', 'crack'


def read_polygons(path: str) -> list[np.ndarray]:
  """[(K, 2) normalized (x, y)] per line of a YOLO-seg label file; ValueError naming the line."""
  polygons = []
  with open(path) as f:
    for number, line in enumerate(f, start=1):
      fields = line.split()
      if not fields:
        continue
      coords = np.asarray(fields[1:], np.float64)
      if coords.size < 6 or coords.size % 2:
        raise ValueError(f'{path}, line {number}: a polygon needs an even number >= 6 of '
                         f'coordinates after the class, got {coords.size}')
      if not np.isfinite(coords).all() or coords.min() < 0 or coords.max() > 1:
        raise ValueError(f'{path}, line {number}: coordinates must be normalized to [0, 1]')
      polygons.append(coords.reshape(-1, 2))
  return polygons


def rasterize(polygons: list[np.ndarray], height: int, width: int) -> np.ndarray:
  """bool [H, W]: the union of the polygons' interiors and outlines (x * W, y * H in pixels)."""
  from skimage import draw  # pylint: disable=g-import-not-at-top
  mask = np.zeros((height, width), bool)
  for poly in polygons:
    rows = np.clip(poly[:, 1] * height, 0, height - 1)
    cols = np.clip(poly[:, 0] * width, 0, width - 1)
    mask[draw.polygon(rows, cols, shape=mask.shape)] = True
    mask[draw.polygon_perimeter(np.round(rows), np.round(cols), shape=mask.shape)] = True
  return mask


def find_items(src: str) -> list[tuple[str, str]]:
  """(image path, label path) for every image of SRC/Datasets/images/*/ (or SRC/images/*/)."""
  root = os.path.join(src, 'Datasets') if os.path.isdir(os.path.join(src, 'Datasets')) else src
  items = []
  for split in sorted(os.listdir(os.path.join(root, 'images'))):
    folder = os.path.join(root, 'images', split)
    for name in sorted(os.listdir(folder)):
      stem, ext = os.path.splitext(name)
      if ext.lower() not in ('.jpg', '.jpeg', '.png', '.bmp'):
        continue
      label = os.path.join(root, 'labels', split, stem + '.txt')
      if not os.path.exists(label):
        raise FileNotFoundError(f'no label file {label} for image {os.path.join(folder, name)}')
      items.append((os.path.join(folder, name), label))
  if not items:
    raise FileNotFoundError(f'no images under {root}/images/*/')
  return items


def convert(src: str, out: str, *, test_fraction: float = 0.2, seed: int = 0) -> dict:
  """Writes the MVTec layout (module docstring) into OUT; returns the counts per folder.

  round(test_fraction * n) of the n defect-free images, chosen by a permutation drawn with `seed`,
  go to test/good; the rest to train/good.
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  items = find_items(src)
  names = [os.path.basename(p) for p, _ in items]
  if len(set(names)) != len(names):
    raise ValueError(f'image file names repeat across the splits of {src}')
  unique: dict[str, tuple[str, list]] = {}  # content hash -> (first image path, polygons)
  for image, label in items:
    with open(image, 'rb') as f:
      key = hashlib.sha256(f.read()).hexdigest()
    first, polygons = unique.get(key, (image, []))
    unique[key] = (first, polygons + read_polygons(label))  # a twin's labels join the first's
  good, defect = [], []
  for image, polygons in unique.values():
    (defect if polygons else good).append((image, polygons))
  n_test = int(round(test_fraction * len(good)))
  order = np.random.default_rng(seed).permutation(len(good))
  test_good = {int(i) for i in order[:n_test]}
  for sub in ('train/good', 'test/good', f'test/{DEFECT}', f'ground_truth/{DEFECT}'):
    os.makedirs(os.path.join(out, sub), exist_ok=True)
  for i, (image, _) in enumerate(good):
    dest = os.path.join(out, 'test/good' if i in test_good else 'train/good')
    shutil.copyfile(image, os.path.join(dest, os.path.basename(image)))
  for image, polygons in defect:
    name = os.path.basename(image)
    shutil.copyfile(image, os.path.join(out, 'test', DEFECT, name))
    with Image.open(image) as im:
      width, height = im.size
    mask = rasterize(polygons, height, width)
    stem = os.path.splitext(name)[0]
    Image.fromarray(mask.astype(np.uint8) * 255).save(
        os.path.join(out, 'ground_truth', DEFECT, f'{stem}_mask.png'))
  return {'train/good': len(good) - n_test, 'test/good': n_test, f'test/{DEFECT}': len(defect),
          'duplicates_dropped': len(items) - len(unique)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--src', required=True, help='a copy of KolektorSDD_Yolov8_Datasets')
  parser.add_argument('--out', required=True, help='the MVTec-layout folder to write')
  parser.add_argument('--test_fraction', type=float, default=0.2,
                      help='share of the defect-free images held out for testing')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  counts = convert(args.src, args.out, test_fraction=args.test_fraction, seed=args.seed)
  print(f'wrote {args.out}: {counts}')


if __name__ == '__main__':
  main()
