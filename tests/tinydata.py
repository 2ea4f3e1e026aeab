"""Tiny datasets in dataset_tool.py's layout, built by the tests themselves (never downloaded)."""

import io
import json
import zipfile

import numpy as np
import PIL.Image


def make_dataset_zip(path, num_images=64, resolution=8, num_classes=4, labels=True, seed=0) -> str:
    """Random RGB images as 00000/img00000000.png ... plus dataset.json (labels i % num_classes, or null)."""
    rnd = np.random.RandomState(seed)
    entries = []
    with zipfile.ZipFile(path, 'w') as z:
        for i in range(num_images):
            img = rnd.randint(0, 256, size=[resolution, resolution, 3], dtype=np.uint8)
            buf = io.BytesIO()
            PIL.Image.fromarray(img).save(buf, format='png')
            name = f'{i // 1000:05d}/img{i:08d}.png'
            z.writestr(name, buf.getvalue())
            entries.append([name, i % num_classes])
        z.writestr('dataset.json', json.dumps(dict(labels=entries if labels else None)))
    return str(path)
