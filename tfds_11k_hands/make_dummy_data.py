"""Regenerates tfds_11k_hands/dummy_data: tiny fake hands in the real 11k Hands layout.

  python -m tfds_11k_hands.make_dummy_data [--out DIR]

Layout: HandInfo.csv, Hands/Hand_XXXXXXX.jpg (40x30, a skin-coloured ellipse on white), masks/
Hand_XXXXXXX.png for the images with jewelry (a blue "ring" drawn on the hand; the mask marks it
exactly; one mask is stored at twice the image size to exercise resizing).

10 subjects x 2 healthy images; 4 images with accessories=1 and a mask (test); 1 image with
accessories=1 and no mask (left out by the builder).
"""
import argparse
import csv
import os

import numpy as np
from PIL import Image

W, H = 40, 30
RING = (20, 40, 230)
COLUMNS = ['id', 'age', 'gender', 'skinColor', 'accessories', 'nailPolish', 'aspectOfHand',
           'imageName', 'irregularities']
SKINS = {'fair': (235, 200, 175), 'medium': (200, 150, 110), 'dark': (120, 80, 55)}


def _hand(rng, skin):
  yy, xx = np.mgrid[:H, :W]
  img = np.full((H, W, 3), 250, np.float64)
  cy, cx = H / 2 + rng.uniform(-2, 2), W / 2 + rng.uniform(-3, 3)
  inside = ((yy - cy) / 11) ** 2 + ((xx - cx) / 15) ** 2 <= 1
  img[inside] = SKINS[skin]
  img += rng.normal(0, 3, img.shape)
  return img, (int(cy), int(cx))


def make(out: str) -> None:
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(out, 'Hands'), exist_ok=True)
  os.makedirs(os.path.join(out, 'masks'), exist_ok=True)
  rows = []
  idx = 0
  skins = list(SKINS)
  aspects = ['dorsal right', 'dorsal left', 'palmar right', 'palmar left']

  def add(subject, accessories, with_mask):
    nonlocal idx
    idx += 1
    name = f'Hand_{idx:07d}.jpg'
    skin = skins[subject % len(skins)]
    img, (cy, cx) = _hand(rng, skin)
    if accessories:
      y0, x0 = cy - 3, cx - 5
      ring = np.zeros((H, W), bool)
      ring[y0:y0 + 7, x0:x0 + 10] = True
      img[ring] = RING
      if with_mask:
        mask = Image.fromarray(ring.astype(np.uint8) * 255)
        if idx % 2:  # any size with the image's aspect ratio
          mask = mask.resize((2 * W, 2 * H), Image.NEAREST)
        mask.save(os.path.join(out, 'masks', name.replace('.jpg', '.png')))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(
        os.path.join(out, 'Hands', name), quality=90)
    rows.append({'id': str(subject), 'age': 20 + subject, 'gender': 'male' if subject % 2 else
                 'female', 'skinColor': skin, 'accessories': accessories, 'nailPolish': 0,
                 'aspectOfHand': aspects[idx % 4], 'imageName': name, 'irregularities': 0})

  for subject in range(10):
    for _ in range(2):
      add(subject, 0, False)
  for subject in range(4):
    add(subject, 1, True)
  add(9, 1, False)
  with open(os.path.join(out, 'HandInfo.csv'), 'w', newline='') as f:
    writer = csv.DictWriter(f, fieldnames=COLUMNS)
    writer.writeheader()
    writer.writerows(rows)


if __name__ == '__main__':
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument('--out', default=os.path.join(os.path.dirname(__file__), 'dummy_data'))
  make(parser.parse_args().out)
